//! Socket tests of the MQTT adapter: a real hub on loopback (port 0), driven by a small MQTT
//! client made of the same packet codec over TLS (MQTTS, or MQTT over WebSockets on the HTTPS
//! listener), mixed with AMQP modules of the fe2o3 client.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails on any error; each wait is bounded by WAIT"
)]

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::{start_hub, start_hub_https, start_hub_https_limits, TestHub, IOTHUB, WAIT};
use edgehub::{
    app::device_key,
    core::auth::module_keys,
    model::{
        identity::{Identity, ModuleId},
        sas::{make_token, now_secs, resource_for},
    },
};
use fe2o3_amqp::types::{
    messaging::{Body, Message, Outcome, Properties},
    primitives::Value,
};
use futures_util::{SinkExt, StreamExt};
use rumqttc::mqttbytes::{
    v4::{
        Codec, ConnAck, Connect, ConnectReturnCode, LastWill, Login, Packet, PubAck, Publish,
        Subscribe, SubscribeReasonCode,
    },
    QoS,
};
use tokio::time::timeout;
use tokio_util::codec::{FramedRead, FramedWrite};

/// A byte stream to the hub: TLS, or a WebSocket over TLS.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}
type Stream = Box<dyn Io>;

struct Mqtt {
    rx: FramedRead<tokio::io::ReadHalf<Stream>, Codec>,
    tx: FramedWrite<tokio::io::WriteHalf<Stream>, Codec>,
    next_pkid: u16,
}

fn codec() -> Codec {
    Codec {
        max_incoming_size: 1 << 20,
        max_outgoing_size: 1 << 20,
    }
}

/// How a test client reaches the hub.
#[derive(Clone, Copy)]
enum Via<'a> {
    Mqtts,
    /// MQTTS with a client certificate.
    MqttsCert(&'a ClientCert),
    /// MQTT over WebSockets on the HTTPS listener.
    WebSocket,
    /// MQTT over WebSockets, with a client certificate in the TLS handshake.
    WebSocketCert(&'a ClientCert),
}

/// A client certificate: its chain and key.
struct ClientCert {
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
}

async fn tls(hub: &TestHub, via: Via<'_>) -> Stream {
    let h = hub.hub.as_ref().unwrap();
    let addr = match via {
        Via::WebSocket | Via::WebSocketCert(_) => h.https_addr.expect("https is on"),
        Via::Mqtts | Via::MqttsCert(_) => h.mqtts_addr.expect("mqtts is on"),
    };
    let ca = std::fs::read(hub.settings.data_dir.join("certs").join("edge-ca.pem")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    for c in CertificateDer::pem_slice_iter(&ca) {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = match via {
        Via::MqttsCert(c) | Via::WebSocketCert(c) => config
            .with_client_auth_cert(c.chain.clone(), c.key.clone_key())
            .unwrap(),
        _ => config.with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    match via {
        Via::WebSocket | Via::WebSocketCert(_) => Box::new(websocket(tls, "mqtt").await.unwrap()),
        Via::Mqtts | Via::MqttsCert(_) => Box::new(tls),
    }
}

/// The WebSocket upgrade the SDKs send, offering `subprotocol`; the WebSocket as a byte stream,
/// or the status of a refusal.
async fn websocket<S>(stream: S, subprotocol: &str) -> Result<edgehub::servers::ws::WsIo<S>, u16>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Error};
    let mut req = "wss://localhost/$iothub/websocket"
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", subprotocol.parse().unwrap());
    match timeout(WAIT, tokio_tungstenite::client_async(req, stream))
        .await
        .expect("the upgrade is answered in time")
    {
        Ok((ws, response)) => {
            assert_eq!(
                response
                    .headers()
                    .get("Sec-WebSocket-Protocol")
                    .and_then(|v| v.to_str().ok()),
                Some(subprotocol)
            );
            Ok(edgehub::servers::ws::WsIo::new(ws))
        }
        Err(Error::Http(r)) => Err(r.status().as_u16()),
        Err(e) => panic!("WebSocket upgrade: {e}"),
    }
}

fn module_token(hub: &TestHub, m: &str) -> String {
    let key = device_key(&hub.settings).unwrap();
    let keys = module_keys(&hub.settings, &key, &ModuleId::parse(m).unwrap());
    make_token(
        &resource_for(IOTHUB, &hub.module(m)),
        &keys.primary,
        now_secs() + 3600,
        None,
    )
}

fn username(m: &str) -> String {
    format!("{IOTHUB}/edge1/{m}/?api-version=2021-04-12&DeviceClientType=test%2F1.0")
}

impl Mqtt {
    async fn open(hub: &TestHub) -> Self {
        Self::open_via(hub, Via::Mqtts).await
    }

    async fn open_via(hub: &TestHub, via: Via<'_>) -> Self {
        Self::from_stream(tls(hub, via).await)
    }

    fn from_stream(stream: Stream) -> Self {
        let (r, w) = tokio::io::split(stream);
        Self {
            rx: FramedRead::new(r, codec()),
            tx: FramedWrite::new(w, codec()),
            next_pkid: 0,
        }
    }

    async fn send(&mut self, p: Packet) {
        timeout(WAIT, self.tx.send(p)).await.unwrap().unwrap();
    }

    /// The next packet; `None` once the hub closed the connection.
    async fn next(&mut self) -> Option<Packet> {
        match timeout(WAIT, self.rx.next())
            .await
            .expect("a packet in time")
        {
            Some(Ok(p)) => Some(p),
            _ => None,
        }
    }

    async fn connect_as(
        hub: &TestHub,
        client_id: &str,
        user: &str,
        password: &str,
        keep_alive: u16,
        clean: bool,
    ) -> (Self, ConnAck) {
        let mut connect = Connect::new(client_id);
        connect.keep_alive = keep_alive;
        connect.clean_session = clean;
        connect.login = Some(Login::new(user, password));
        Self::connect_with(hub, Via::Mqtts, connect).await
    }

    async fn connect_with(hub: &TestHub, via: Via<'_>, connect: Connect) -> (Self, ConnAck) {
        let mut c = Self::open_via(hub, via).await;
        c.send(Packet::Connect(connect)).await;
        match c.next().await {
            Some(Packet::ConnAck(a)) => (c, a),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    async fn module(hub: &TestHub, m: &str, clean: bool) -> (Self, ConnAck) {
        Self::module_via(hub, m, clean, Via::Mqtts).await
    }

    async fn module_via(hub: &TestHub, m: &str, clean: bool, via: Via<'_>) -> (Self, ConnAck) {
        let mut connect = Connect::new(format!("edge1/{m}"));
        connect.keep_alive = 60;
        connect.clean_session = clean;
        connect.login = Some(Login::new(username(m), module_token(hub, m)));
        let (c, ack) = Self::connect_with(hub, via, connect).await;
        assert_eq!(ack.code, ConnectReturnCode::Success);
        (c, ack)
    }

    fn pkid(&mut self) -> u16 {
        self.next_pkid += 1;
        self.next_pkid
    }

    async fn subscribe(&mut self, filter: &str, qos: QoS) -> SubscribeReasonCode {
        let mut s = Subscribe::new(filter, qos);
        s.pkid = self.pkid();
        self.send(Packet::Subscribe(s)).await;
        loop {
            match self.next().await {
                Some(Packet::SubAck(a)) => return a.return_codes[0],
                Some(_) => continue,
                None => panic!("closed before SUBACK"),
            }
        }
    }

    /// Publishes at QoS 1 and waits for the PUBACK; other packets on the way are returned.
    async fn publish1(&mut self, topic: &str, payload: &[u8]) -> Vec<Packet> {
        let mut p = Publish::new(topic, QoS::AtLeastOnce, payload.to_vec());
        let pkid = self.pkid();
        p.pkid = pkid;
        self.send(Packet::Publish(p)).await;
        let mut others = Vec::new();
        loop {
            match self.next().await {
                Some(Packet::PubAck(a)) if a.pkid == pkid => return others,
                Some(p) => others.push(p),
                None => panic!("closed before PUBACK"),
            }
        }
    }

    /// The next PUBLISH from the hub.
    async fn publish_in(&mut self) -> Publish {
        loop {
            match self.next().await {
                Some(Packet::Publish(p)) => return p,
                Some(_) => continue,
                None => panic!("closed before a PUBLISH"),
            }
        }
    }
}

const ROUTES: &str = r#"{
    "mqttToAmqp": "FROM /messages/modules/A/outputs/out1 INTO BrokeredEndpoint(\"/modules/B/inputs/in1\")",
    "amqpToMqtt": "FROM /messages/modules/B/outputs/back INTO BrokeredEndpoint(\"/modules/A/inputs/in2\")"
}"#;

fn bag_value(topic: &str, key: &str) -> Option<String> {
    let bag = topic.rsplit('/').next()?;
    bag.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        let k = percent_encoding::percent_decode_str(k).decode_utf8_lossy();
        (k == key).then(|| {
            percent_encoding::percent_decode_str(v)
                .decode_utf8_lossy()
                .into_owned()
        })
    })
}

#[tokio::test]
async fn connack_codes_follow_edgehub() {
    let hub = start_hub(ROUTES, "{}").await;
    let good = module_token(&hub, "A");
    // Another module's token for A.
    let wrong = module_token(&hub, "B");
    let (_, ok) = Mqtt::connect_as(&hub, "edge1/A", &username("A"), &good, 60, true).await;
    assert_eq!(ok.code, ConnectReturnCode::Success);
    assert!(!ok.session_present);
    let (mut c, refused) =
        Mqtt::connect_as(&hub, "edge1/A", &username("A"), &wrong, 60, true).await;
    assert_eq!(refused.code, ConnectReturnCode::NotAuthorized);
    assert!(c.next().await.is_none(), "closed after a refusal");
    let (mut c, unknown) = Mqtt::connect_as(&hub, "edge1/Z", &username("Z"), &good, 60, true).await;
    assert_eq!(unknown.code, ConnectReturnCode::BadClientId);
    assert!(c.next().await.is_none());
    // A first packet that is not CONNECT closes the connection without a word.
    let mut c = Mqtt::open(&hub).await;
    c.send(Packet::PingReq).await;
    assert!(c.next().await.is_none());
    let scrape = hub.scrape().await;
    assert!(
        scrape.contains("edgehub_client_connect_failed_total{")
            && scrape.contains("reason=\"unknown_identity\""),
        "{scrape}"
    );
    hub.stop().await;
}

#[tokio::test]
async fn outputs_are_routed_to_an_amqp_module_and_back_to_the_mqtt_module_input() {
    let hub = start_hub(ROUTES, "{}").await;
    let (mut a, _) = Mqtt::module(&hub, "A", true).await;
    assert_eq!(
        a.subscribe("devices/edge1/modules/A/inputs/#", QoS::AtLeastOnce)
            .await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    let mut b = hub.connect("B").await;
    let mut b_in = b
        .receiver("/devices/edge1/modules/B/messages/events")
        .await
        .unwrap();
    let mut b_out = b
        .sender("/devices/edge1/modules/B/messages/events")
        .await
        .unwrap();
    // MQTT module A → route → AMQP module B (PUBACK once queued and durable).
    a.publish1(
        "devices/edge1/modules/A/messages/events/%24.on=out1&%24.mid=m1&%24.ct=application%2Fjson&%24.ce=utf-8&temp=21/",
        b"{\"t\":21}",
    )
    .await;
    let d = timeout(WAIT, b_in.recv::<Body<Value>>())
        .await
        .unwrap()
        .unwrap();
    b_in.accept(&d).await.unwrap();
    let msg = d.message();
    let props = msg.properties.as_ref().unwrap();
    assert_eq!(props.message_id, Some("m1".to_owned().into()));
    assert_eq!(
        props.content_type.as_ref().map(|c| c.0.as_str()),
        Some("application/json")
    );
    let app = msg.application_properties.as_ref().unwrap();
    assert_eq!(
        app.0.get("temp"),
        Some(&fe2o3_amqp::types::primitives::SimpleValue::String(
            "21".into()
        ))
    );
    // AMQP module B → route → MQTT module A's input, with its properties in the bag.
    let back = Message::builder()
        .properties(Properties {
            message_id: Some("m2".to_owned().into()),
            ..Default::default()
        })
        .application_properties(
            fe2o3_amqp::types::messaging::ApplicationProperties::builder()
                .insert("iothub-outputname", "back")
                .insert("k", "v w")
                .build(),
        )
        .body(Body::<Value>::Data(
            vec![fe2o3_amqp::types::messaging::Data(
                fe2o3_amqp::types::primitives::Binary::from(b"pong".to_vec()),
            )]
            .into(),
        ))
        .build();
    let outcome = timeout(WAIT, b_out.send(back)).await.unwrap().unwrap();
    assert!(matches!(outcome, Outcome::Accepted(_)));
    let p = a.publish_in().await;
    assert_eq!(p.qos, QoS::AtLeastOnce);
    assert!(
        p.topic.starts_with("devices/edge1/modules/A/inputs/in2/"),
        "{}",
        p.topic
    );
    assert_eq!(p.payload, Bytes::from_static(b"pong"));
    assert_eq!(bag_value(&p.topic, "k").as_deref(), Some("v w"));
    assert_eq!(bag_value(&p.topic, "$.mid").as_deref(), Some("m2"));
    assert_eq!(bag_value(&p.topic, "$.cdid").as_deref(), Some("edge1"));
    assert_eq!(bag_value(&p.topic, "$.cmid").as_deref(), Some("B"));
    a.send(Packet::PubAck(PubAck::new(p.pkid))).await;
    // Completed: the queue is empty once the acknowledgement is in.
    let core = hub.hub.as_ref().unwrap().core.clone();
    let module_a = ModuleId::parse("A").unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (endpoints, _) = core.router().module_inputs(&module_a);
        let held: usize = endpoints.iter().map(|e| e.store.len()).sum();
        if held == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{held} still held");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    hub.stop().await;
}

#[tokio::test]
async fn a_publish_to_another_identitys_topic_closes_the_connection_and_is_counted() {
    let hub = start_hub(ROUTES, "{}").await;
    let (mut a, _) = Mqtt::module(&hub, "A", true).await;
    // A subscription to another module's inputs is refused.
    assert_eq!(
        a.subscribe("devices/edge1/modules/B/#", QoS::AtLeastOnce)
            .await,
        SubscribeReasonCode::Failure
    );
    let mut p = Publish::new(
        "devices/edge1/modules/B/messages/events/%24.on=out1",
        QoS::AtLeastOnce,
        b"x".to_vec(),
    );
    p.pkid = 9;
    a.send(Packet::Publish(p)).await;
    assert!(a.next().await.is_none(), "the hub closes the connection");
    let scrape = hub.scrape().await;
    assert!(
        scrape
            .lines()
            .any(|l| l.starts_with("edgehub_mqtt_refused_total{")
                && l.contains("reason=\"foreign_topic\"")),
        "{scrape}"
    );
    hub.stop().await;
}

#[tokio::test]
async fn a_silent_client_is_closed_after_one_and_a_half_keep_alives() {
    let hub = start_hub(ROUTES, "{}").await;
    let (mut c, ack) = Mqtt::connect_as(
        &hub,
        "edge1/A",
        &username("A"),
        &module_token(&hub, "A"),
        1,
        true,
    )
    .await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    // A PINGREQ is answered and keeps the connection.
    c.send(Packet::PingReq).await;
    assert_eq!(c.next().await, Some(Packet::PingResp));
    let started = std::time::Instant::now();
    assert!(c.next().await.is_none());
    let waited = started.elapsed();
    assert!(
        waited >= std::time::Duration::from_millis(1000)
            && waited < std::time::Duration::from_secs(10),
        "{waited:?}"
    );
    hub.stop().await;
}

#[tokio::test]
async fn a_second_connection_of_the_same_client_replaces_the_first() {
    let hub = start_hub(ROUTES, "{}").await;
    let (mut first, _) = Mqtt::module(&hub, "A", true).await;
    let (mut second, _) = Mqtt::module(&hub, "A", true).await;
    assert!(
        first.next().await.is_none(),
        "the older connection is closed"
    );
    second.send(Packet::PingReq).await;
    assert_eq!(second.next().await, Some(Packet::PingResp));
    hub.stop().await;
}

#[tokio::test]
async fn twins_get_patch_and_desired_pushes() {
    let hub = start_hub(ROUTES, "{}").await;
    let (mut a, _) = Mqtt::module(&hub, "A", true).await;
    a.subscribe("$iothub/twin/res/#", QoS::AtMostOnce).await;
    a.subscribe("$iothub/twin/PATCH/properties/desired/#", QoS::AtMostOnce)
        .await;
    a.send(Packet::Publish(Publish::new(
        "$iothub/twin/GET/?$rid=r1",
        QoS::AtMostOnce,
        b" ".to_vec(),
    )))
    .await;
    let res = a.publish_in().await;
    assert_eq!(res.topic, "$iothub/twin/res/200/?$rid=r1");
    let twin: serde_json::Value = serde_json::from_slice(&res.payload).unwrap();
    assert!(twin["desired"]["$version"].is_number(), "{twin}");
    // Reported patch at QoS 1: answered with 204 and the new reported version.
    let others = a
        .publish1(
            "$iothub/twin/PATCH/properties/reported/?$rid=r2",
            br#"{"status":"ok"}"#,
        )
        .await;
    let res = match others.into_iter().find_map(|p| match p {
        Packet::Publish(p) => Some(p),
        _ => None,
    }) {
        Some(p) => p,
        None => a.publish_in().await,
    };
    assert_eq!(res.topic, "$iothub/twin/res/204/?$rid=r2&$version=2");
    let twin = hub.hub.as_ref().unwrap().core.twins.get(&hub.module("A"));
    assert_eq!(twin.to_json()["reported"]["status"], "ok");
    // A desired change made through the core reaches the module as a patch with $version.
    let mut patch = serde_json::Map::new();
    patch.insert("speed".into(), 5.into());
    hub.hub
        .as_ref()
        .unwrap()
        .core
        .twins
        .patch_desired(&hub.module("A"), &patch, |_| true)
        .await
        .unwrap();
    let push = a.publish_in().await;
    assert!(
        push.topic
            .starts_with("$iothub/twin/PATCH/properties/desired/?$version="),
        "{}",
        push.topic
    );
    let body: serde_json::Value = serde_json::from_slice(&push.payload).unwrap();
    assert_eq!(body["speed"], 5);
    assert_eq!(
        push.topic.rsplit('=').next().unwrap(),
        body["$version"].to_string()
    );
    // A malformed patch gets an error body the Node SDK recognises.
    a.send(Packet::Publish(Publish::new(
        "$iothub/twin/PATCH/properties/reported/?$rid=r3",
        QoS::AtMostOnce,
        b"[1]".to_vec(),
    )))
    .await;
    let res = a.publish_in().await;
    assert_eq!(res.topic, "$iothub/twin/res/400/?$rid=r3");
    let body: serde_json::Value = serde_json::from_slice(&res.payload).unwrap();
    assert_eq!(body["errorCode"], 400004);
    hub.stop().await;
}

#[tokio::test]
async fn direct_methods_reach_an_mqtt_module_and_its_answer_returns() {
    let hub = start_hub(ROUTES, "{}").await;
    let (mut a, _) = Mqtt::module(&hub, "A", true).await;
    a.subscribe("$iothub/methods/POST/#", QoS::AtLeastOnce)
        .await;
    let core = hub.hub.as_ref().unwrap().core.clone();
    let target: Identity = hub.module("A");
    let call = tokio::spawn(async move {
        core.methods
            .invoke(&target, "reset", br#"{"a":1}"#.to_vec(), WAIT, WAIT)
            .await
    });
    let req = a.publish_in().await;
    assert!(
        req.topic.starts_with("$iothub/methods/POST/reset/?$rid="),
        "{}",
        req.topic
    );
    assert_eq!(req.qos, QoS::AtLeastOnce);
    assert_eq!(req.payload, Bytes::from_static(br#"{"a":1}"#));
    a.send(Packet::PubAck(PubAck::new(req.pkid))).await;
    let rid = req.topic.rsplit('=').next().unwrap().to_owned();
    a.publish1(
        &format!("$iothub/methods/res/200/?$rid={rid}"),
        br#"{"done":true}"#,
    )
    .await;
    let answer = timeout(WAIT, call).await.unwrap().unwrap().unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.payload, br#"{"done":true}"#.to_vec());
    hub.stop().await;
}

#[tokio::test]
async fn a_persistent_session_keeps_its_subscriptions_across_reconnects() {
    let hub = start_hub(ROUTES, "{}").await;
    let (mut a, ack) = Mqtt::module(&hub, "A", false).await;
    assert!(!ack.session_present);
    a.subscribe("devices/edge1/modules/A/inputs/#", QoS::AtLeastOnce)
        .await;
    a.send(Packet::Disconnect).await;
    assert!(a.next().await.is_none());
    // Reconnect without subscribing again (as the Python SDK does): inputs still arrive.
    let (mut a, ack) = Mqtt::module(&hub, "A", false).await;
    assert!(ack.session_present);
    let mut b = hub.connect("B").await;
    let mut b_out = b
        .sender("/devices/edge1/modules/B/messages/events")
        .await
        .unwrap();
    let back = Message::builder()
        .application_properties(
            fe2o3_amqp::types::messaging::ApplicationProperties::builder()
                .insert("iothub-outputname", "back")
                .build(),
        )
        .body(Body::<Value>::Data(
            vec![fe2o3_amqp::types::messaging::Data(
                fe2o3_amqp::types::primitives::Binary::from(b"again".to_vec()),
            )]
            .into(),
        ))
        .build();
    timeout(WAIT, b_out.send(back)).await.unwrap().unwrap();
    let p = a.publish_in().await;
    assert!(p.topic.starts_with("devices/edge1/modules/A/inputs/in2/"));
    a.send(Packet::PubAck(PubAck::new(p.pkid))).await;
    // A clean session forgets it.
    drop(a);
    let (_a, ack) = Mqtt::module(&hub, "A", true).await;
    assert!(!ack.session_present);
    let (_a, ack) = Mqtt::module(&hub, "A", false).await;
    assert!(!ack.session_present);
    hub.stop().await;
}

const SERVICE_KEY: &str = "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=";

/// A hub with the HTTPS listener and the service policy `service` (key `SERVICE_KEY`).
async fn service_hub() -> TestHub {
    start_hub_https(
        ROUTES,
        &format!(r#""servicePolicies": {{"service": {{"primaryKey": "{SERVICE_KEY}"}}}},"#),
    )
    .await
}

/// A registry call of the service API (`servicePolicies.service` holds `SERVICE_KEY`).
async fn registry(
    hub: &TestHub,
    method: &str,
    path: &str,
    body: &serde_json::Value,
) -> serde_json::Value {
    let token = make_token(
        IOTHUB,
        &edgehub::model::identity::Key::from_base64(SERVICE_KEY).unwrap(),
        now_secs() + 3600,
        Some("service"),
    );
    let text = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    let mut headers = vec![
        ("Authorization", token.as_str()),
        ("Content-Type", "application/json; charset=utf-8"),
    ];
    if method == "DELETE" {
        headers.push(("If-Match", "\"*\""));
    }
    let r = hub
        .https(
            method,
            &format!("{path}?api-version=2021-04-12"),
            &headers,
            &text,
        )
        .await;
    assert!(
        r.status == 200 || r.status == 204,
        "{method} {path}: {} {:?}",
        r.status,
        r.body
    );
    r.body
}

/// Creates a registry device (`m` = `None`) or module with generated keys; its SAS token.
async fn registry_identity(hub: &TestHub, d: &str, m: Option<&str>) -> String {
    use edgehub::model::identity::{DeviceId, Key};
    let sas =
        serde_json::json!({"type": "sas", "symmetricKey": {"primaryKey": "", "secondaryKey": ""}});
    let device = DeviceId::parse(d).unwrap();
    let (path, body, id) = match m {
        None => (
            format!("/devices/{d}"),
            serde_json::json!({"deviceId": d, "authentication": sas}),
            Identity::Device(device),
        ),
        Some(m) => (
            format!("/devices/{d}/modules/{m}"),
            serde_json::json!({"deviceId": d, "moduleId": m, "authentication": sas}),
            Identity::Module(device, ModuleId::parse(m).unwrap()),
        ),
    };
    let r = registry(hub, "PUT", &path, &body).await;
    let key = r["authentication"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap();
    make_token(
        &resource_for(IOTHUB, &id),
        &Key::from_base64(key).unwrap(),
        now_secs() + 3600,
        None,
    )
}

#[tokio::test]
async fn an_input_acknowledged_before_a_publish_in_one_write_frees_its_room_for_it() {
    // A module whose output comes back to its own input, that queue full: the PUBACK of an
    // input read in the same step as the next PUBLISH frees the room that PUBLISH needs.
    let hub = start_hub(
        r#"{"loop": "FROM /messages/modules/A/outputs/loop INTO BrokeredEndpoint(\"/modules/A/inputs/back\")"}"#,
        r#"{"queueCapacity": 2}"#,
    )
    .await;
    let (mut a, _) = Mqtt::module(&hub, "A", true).await;
    a.subscribe("devices/edge1/modules/A/#", QoS::AtLeastOnce)
        .await;
    let topic = "devices/edge1/modules/A/messages/events/%24.on=loop";
    let mut inputs = Vec::new();
    for body in [b"one", b"two"] {
        inputs.extend(
            a.publish1(topic, body)
                .await
                .into_iter()
                .filter_map(|p| match p {
                    Packet::Publish(p) => Some(p),
                    _ => None,
                }),
        );
    }
    while inputs.len() < 2 {
        inputs.push(a.publish_in().await);
    }
    // The queue holds two unacknowledged inputs: it is full. One PUBACK and the next PUBLISH
    // go out in one write.
    let mut p = Publish::new(topic, QoS::AtLeastOnce, b"three".to_vec());
    let pkid = a.pkid();
    p.pkid = pkid;
    timeout(WAIT, async {
        a.tx.feed(Packet::PubAck(PubAck::new(inputs[0].pkid)))
            .await?;
        a.tx.feed(Packet::Publish(p)).await?;
        a.tx.flush().await
    })
    .await
    .unwrap()
    .unwrap();
    loop {
        match a.next().await {
            Some(Packet::PubAck(ack)) if ack.pkid == pkid => break,
            Some(_) => continue,
            None => panic!("closed before the PUBACK"),
        }
    }
    hub.stop().await;
}

#[tokio::test]
async fn clients_connected_on_behalf_of_a_child_hub_end_with_it() {
    use edgehub::model::identity::{DeviceId, Key, KeySlot};
    let hub = service_hub().await;
    let sas =
        serde_json::json!({"type": "sas", "symmetricKey": {"primaryKey": "", "secondaryKey": ""}});
    let hub2 = registry(
        &hub,
        "PUT",
        "/devices/hub2",
        &serde_json::json!({"deviceId": "hub2", "authentication": sas, "capabilities": {"iotEdge": true}}),
    )
    .await;
    let scope = hub2["deviceScope"].as_str().unwrap().to_owned();
    registry(
        &hub,
        "PUT",
        "/devices/leaf9",
        &serde_json::json!({"deviceId": "leaf9", "parentScopes": [scope]}),
    )
    .await;
    // The child hub's `$edgeHub` token, with the key derived from the device's.
    let (d, edge_hub) = (
        DeviceId::parse("hub2").unwrap(),
        ModuleId::parse("$edgeHub").unwrap(),
    );
    let key = Key::from_base64(
        hub2["authentication"]["symmetricKey"]["primaryKey"]
            .as_str()
            .unwrap(),
    )
    .unwrap()
    .derive_module_key(&d, &edge_hub, KeySlot::Primary);
    let token = make_token(
        &resource_for(IOTHUB, &Identity::Module(d, edge_hub)),
        &key,
        now_secs() + 3600,
        None,
    );
    let on_behalf = async |client: &str, chain: &str| {
        let user = format!(
            "{IOTHUB}/{client}/?api-version=2020-09-30&auth-chain={}",
            percent_encoding::utf8_percent_encode(chain, percent_encoding::NON_ALPHANUMERIC)
        );
        let (c, ack) = Mqtt::connect_as(&hub, client, &user, &token, 60, true).await;
        assert_eq!(ack.code, ConnectReturnCode::Success, "{client}");
        c
    };
    // A leaf device under its scope (a registry identity of its own, still enabled after the
    // child hub is gone) and a module of the child hub (not in the registry).
    let mut leaf = on_behalf("leaf9", "leaf9;hub2").await;
    let mut module = on_behalf("hub2/sensor", "hub2/sensor;hub2").await;
    registry(&hub, "DELETE", "/devices/hub2", &serde_json::Value::Null).await;
    assert!(leaf.next().await.is_none(), "the leaf's connection ends");
    assert!(
        module.next().await.is_none(),
        "the module's connection ends"
    );
    hub.stop().await;
}

#[tokio::test]
async fn a_registry_delete_drops_the_stored_sessions_of_the_device_and_its_modules() {
    let hub = service_hub().await;
    let user = |cid: &str| format!("{IOTHUB}/{cid}/?api-version=2021-04-12");
    // A persistent session each: the device's C2D, the module's inputs.
    let subscribed = async |cid: &str, token: &str, filter: &str, present: bool| {
        let (mut c, ack) = Mqtt::connect_as(&hub, cid, &user(cid), token, 60, false).await;
        assert_eq!(ack.code, ConnectReturnCode::Success, "{cid}");
        assert_eq!(ack.session_present, present, "{cid}");
        c.subscribe(filter, QoS::AtLeastOnce).await;
        c.send(Packet::Disconnect).await;
        assert!(c.next().await.is_none());
    };
    let device = registry_identity(&hub, "dev6", None).await;
    let module = registry_identity(&hub, "dev6", Some("m1")).await;
    subscribed(
        "dev6",
        &device,
        "devices/dev6/messages/devicebound/#",
        false,
    )
    .await;
    subscribed("dev6/m1", &module, "devices/dev6/modules/m1/#", false).await;
    // Kept across a reconnect...
    let (_c, ack) = Mqtt::connect_as(&hub, "dev6/m1", &user("dev6/m1"), &module, 60, false).await;
    assert!(ack.session_present);
    drop(_c);
    // ...but not across a delete: created again under the same ids, they start afresh.
    registry(&hub, "DELETE", "/devices/dev6", &serde_json::Value::Null).await;
    let device = registry_identity(&hub, "dev6", None).await;
    let module = registry_identity(&hub, "dev6", Some("m1")).await;
    subscribed(
        "dev6",
        &device,
        "devices/dev6/messages/devicebound/#",
        false,
    )
    .await;
    subscribed("dev6/m1", &module, "devices/dev6/modules/m1/#", false).await;
    // A module deleted on its own loses its session too; its device keeps its own.
    registry(
        &hub,
        "DELETE",
        "/devices/dev6/modules/m1",
        &serde_json::Value::Null,
    )
    .await;
    let module = registry_identity(&hub, "dev6", Some("m1")).await;
    let (_c, ack) = Mqtt::connect_as(&hub, "dev6/m1", &user("dev6/m1"), &module, 60, false).await;
    assert!(!ack.session_present);
    let (_d, ack) = Mqtt::connect_as(&hub, "dev6", &user("dev6"), &device, 60, false).await;
    assert!(ack.session_present);
    hub.stop().await;
}

#[tokio::test]
async fn a_device_subscribed_before_its_first_c2d_message_gets_it_and_the_next_ones() {
    let hub = service_hub().await;
    let token = registry_identity(&hub, "dev7", None).await;
    let user = format!("{IOTHUB}/dev7/?api-version=2021-04-12");
    let connect = async || {
        let (c, ack) = Mqtt::connect_as(&hub, "dev7", &user, &token, 60, false).await;
        assert_eq!(ack.code, ConnectReturnCode::Success);
        (c, ack.session_present)
    };
    let (mut dev, _) = connect().await;
    dev.subscribe("devices/dev7/messages/devicebound/#", QoS::AtLeastOnce)
        .await;
    let key = edgehub::model::identity::Key::from_base64(SERVICE_KEY).unwrap();
    let ca = hub.settings.data_dir.join("certs").join("edge-ca.pem");
    let addr = hub.hub.as_ref().unwrap().amqps_addr;
    let mut svc = timeout(
        WAIT,
        edgehub::client::Client::connect_service(
            addr,
            "localhost",
            &ca,
            "localhost",
            "service",
            &key,
        ),
    )
    .await
    .unwrap()
    .unwrap();
    let mut tx = svc.sender("/messages/devicebound").await.unwrap();
    let c2d = |id: &str| {
        Message::builder()
            .properties(Properties {
                message_id: Some(id.to_owned().into()),
                to: Some("/devices/dev7/messages/devicebound".to_owned()),
                ..Default::default()
            })
            .body(Body::<Value>::Data(
                vec![fe2o3_amqp::types::messaging::Data(
                    fe2o3_amqp::types::primitives::Binary::from(id.as_bytes().to_vec()),
                )]
                .into(),
            ))
            .build()
    };
    // The first message wakes the waiting subscription; the next ones find its pump running.
    for id in ["c1", "c2"] {
        let outcome = timeout(WAIT, tx.send(c2d(id))).await.unwrap().unwrap();
        assert!(matches!(outcome, Outcome::Accepted(_)), "{outcome:?}");
        let p = dev.publish_in().await;
        assert!(p.topic.starts_with("devices/dev7/messages/devicebound/"));
        assert_eq!(bag_value(&p.topic, "$.mid").as_deref(), Some(id));
        assert_eq!(&p.payload[..], id.as_bytes());
        dev.send(Packet::PubAck(PubAck::new(p.pkid))).await;
    }
    // Queued while the device is away: the persistent session delivers it on the reconnect.
    dev.send(Packet::Disconnect).await;
    assert!(dev.next().await.is_none());
    timeout(WAIT, tx.send(c2d("c3"))).await.unwrap().unwrap();
    let (mut dev, present) = connect().await;
    assert!(present);
    let p = dev.publish_in().await;
    assert_eq!(bag_value(&p.topic, "$.mid").as_deref(), Some("c3"));
    hub.stop().await;
}

/// An AMQP module output on `output`, with message id `id`.
fn amqp_output(output: &str, id: &str, body: &[u8]) -> Message<Body<Value>> {
    Message::builder()
        .properties(Properties {
            message_id: Some(id.to_owned().into()),
            ..Default::default()
        })
        .application_properties(
            fe2o3_amqp::types::messaging::ApplicationProperties::builder()
                .insert("iothub-outputname", output)
                .build(),
        )
        .body(Body::<Value>::Data(
            vec![fe2o3_amqp::types::messaging::Data(
                fe2o3_amqp::types::primitives::Binary::from(body.to_vec()),
            )]
            .into(),
        ))
        .build()
}

fn body_bytes(m: &Message<Body<Value>>) -> Vec<u8> {
    match &m.body {
        Body::Data(batch) => batch.iter().flat_map(|d| d.0.to_vec()).collect(),
        other => panic!("{other:?}"),
    }
}

fn app_property(m: &Message<Body<Value>>, key: &str) -> Option<String> {
    match m.application_properties.as_ref()?.0.get(key)? {
        fe2o3_amqp::types::primitives::SimpleValue::String(s) => Some(s.clone()),
        other => panic!("{key}: {other:?}"),
    }
}

/// The value of `edgehub_open_connections{protocol}` in a scrape.
fn open_connections(scrape: &str, protocol: &str) -> Option<f64> {
    scrape
        .lines()
        .find(|l| {
            l.starts_with("edgehub_open_connections{")
                && l.contains(&format!("protocol=\"{protocol}\""))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test]
async fn mqtt_over_websockets_exchanges_messages_with_an_amqp_module() {
    let hub = start_hub_https(ROUTES, "").await;
    let (mut a, _) = Mqtt::module_via(&hub, "A", true, Via::WebSocket).await;
    a.subscribe("devices/edge1/modules/A/inputs/#", QoS::AtLeastOnce)
        .await;
    let mut b = hub.connect("B").await;
    let mut b_in = b
        .receiver("/devices/edge1/modules/B/messages/events")
        .await
        .unwrap();
    let mut b_out = b
        .sender("/devices/edge1/modules/B/messages/events")
        .await
        .unwrap();
    // Larger than a WebSocket read buffer, so the packet spans several reads.
    let big: Vec<u8> = (0..200 * 1024).map(|i| (i % 251) as u8).collect();
    a.publish1(
        "devices/edge1/modules/A/messages/events/%24.on=out1&%24.mid=ws1",
        &big,
    )
    .await;
    let d = timeout(WAIT, b_in.recv::<Body<Value>>())
        .await
        .unwrap()
        .unwrap();
    b_in.accept(&d).await.unwrap();
    let props = d.message().properties.as_ref().unwrap();
    assert_eq!(props.message_id, Some("ws1".to_owned().into()));
    assert_eq!(body_bytes(d.message()), big);
    let outcome = timeout(WAIT, b_out.send(amqp_output("back", "ws2", b"pong")))
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(outcome, Outcome::Accepted(_)));
    let p = a.publish_in().await;
    assert!(p.topic.starts_with("devices/edge1/modules/A/inputs/in2/"));
    assert_eq!(bag_value(&p.topic, "$.mid").as_deref(), Some("ws2"));
    assert_eq!(p.payload, Bytes::from_static(b"pong"));
    a.send(Packet::PubAck(PubAck::new(p.pkid))).await;
    // Counted under its own label (the registry is shared by the tests of this process).
    let scrape = hub.scrape().await;
    assert!(
        open_connections(&scrape, "mqttws").is_some_and(|n| n >= 1.0),
        "{scrape}"
    );
    drop(a);
    b.close().await;
    hub.stop().await;
}

#[tokio::test]
async fn mqtt_over_websockets_takes_the_mqtt_connection_slots() {
    let hub = start_hub_https_limits(
        ROUTES,
        "",
        r#"{"maxConnections": 1, "handshakeTimeoutSecs": 30}"#,
    )
    .await;
    // An authenticated MQTTS module holds the only MQTT slot: the upgrade is refused with 503.
    let (first, _) = Mqtt::module(&hub, "A", true).await;
    let refused = websocket(hub.https_stream().await, "mqtt").await;
    assert_eq!(refused.err(), Some(503));
    // AMQP has slots of its own.
    let amqp = hub.connect("B").await;
    drop(first);
    // Once the hub has seen it go, a module connects over the WebSocket and holds the slot.
    let ws = timeout(WAIT, async {
        loop {
            match websocket(hub.https_stream().await, "mqtt").await {
                Ok(io) => break io,
                Err(503) => tokio::task::yield_now().await,
                Err(status) => panic!("{status}"),
            }
        }
    })
    .await
    .expect("a WebSocket once the slot is free");
    let mut c = Mqtt::from_stream(Box::new(ws));
    let mut connect = Connect::new("edge1/A");
    connect.login = Some(Login::new(username("A"), module_token(&hub, "A")));
    c.send(Packet::Connect(connect)).await;
    assert!(
        matches!(c.next().await, Some(Packet::ConnAck(a)) if a.code == ConnectReturnCode::Success)
    );
    // Now MQTTS finds no slot: the connection is closed at once.
    use tokio::io::AsyncReadExt;
    let addr = hub.hub.as_ref().unwrap().mqtts_addr.unwrap();
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 16];
    let r = timeout(WAIT, tcp.read(&mut buf))
        .await
        .expect("the MQTTS connection is closed");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    amqp.close().await;
    hub.stop().await;
}

/// A self-signed client certificate with subject CN `cn`.
fn self_signed(cn: &str) -> ClientCert {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair};
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2049, 1, 1);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = p.self_signed(&key).unwrap();
    ClientCert {
        chain: vec![cert.der().clone()],
        key: rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    }
}

fn sha256_hex(c: &ClientCert) -> String {
    ring::digest::digest(&ring::digest::SHA256, &c.chain[0])
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A device's CONNECT without a password (for certificate authentication).
fn device_connect(device: &str) -> Connect {
    let mut connect = Connect::new(device);
    connect.keep_alive = 60;
    connect.login = Some(Login::new(
        format!("{IOTHUB}/{device}/?api-version=2021-04-12"),
        "",
    ));
    connect
}

#[tokio::test]
async fn a_device_authenticates_with_its_client_certificate_over_mqtts_and_websockets() {
    let selfie = self_signed("selfie");
    // Same name, another key: its thumbprint is not selfie's.
    let stranger = self_signed("selfie");
    let extra = format!(
        r#""devices": {{
            "selfie": {{"x509": {{"primaryThumbprint": "{}"}}}},
            "keyonly": {{"primaryKey": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}}
        }},"#,
        sha256_hex(&selfie)
    );
    let routes = r#"{"devices": "FROM /messages/* WHERE NOT IS_DEFINED($connectionModuleId) INTO BrokeredEndpoint(\"/modules/B/inputs/devices\")"}"#;
    let hub = start_hub_https(routes, &extra).await;
    let mut b = hub.connect("B").await;
    let mut b_in = b
        .receiver("/devices/edge1/modules/B/messages/events")
        .await
        .unwrap();
    for (n, via) in [Via::MqttsCert(&selfie), Via::WebSocketCert(&selfie)]
        .into_iter()
        .enumerate()
    {
        let (mut c, ack) = Mqtt::connect_with(&hub, via, device_connect("selfie")).await;
        assert_eq!(ack.code, ConnectReturnCode::Success);
        let mid = format!("cert-{n}");
        c.publish1(
            &format!("devices/selfie/messages/events/%24.mid={mid}"),
            b"hi",
        )
        .await;
        let d = timeout(WAIT, b_in.recv::<Body<Value>>())
            .await
            .unwrap()
            .unwrap();
        b_in.accept(&d).await.unwrap();
        let props = d.message().properties.as_ref().unwrap();
        assert_eq!(props.message_id, Some(mid.into()));
        c.send(Packet::Disconnect).await;
        assert!(c.next().await.is_none());
    }
    // CONNACK 5: a certificate that matches no device, one for another device than the client
    // id, and no certificate and no password.
    for (device, via) in [
        ("selfie", Via::MqttsCert(&stranger)),
        ("keyonly", Via::MqttsCert(&selfie)),
        ("selfie", Via::Mqtts),
        ("selfie", Via::WebSocket),
    ] {
        let (mut c, ack) = Mqtt::connect_with(&hub, via, device_connect(device)).await;
        assert_eq!(ack.code, ConnectReturnCode::NotAuthorized, "{device}");
        assert!(c.next().await.is_none(), "closed after a refusal");
    }
    let scrape = hub.scrape().await;
    assert!(
        scrape
            .lines()
            .any(|l| l.starts_with("edgehub_client_connect_failed_total{")
                && l.contains("reason=\"certificate_not_accepted\"")),
        "{scrape}"
    );
    b.close().await;
    hub.stop().await;
}

#[tokio::test]
async fn one_connection_per_identity_across_mqtt_and_amqp() {
    let hub = start_hub(ROUTES, "{}").await;
    // AMQP first: a newer MQTT connection of A detaches its links and closes it.
    let mut amqp = hub.connect("A").await;
    let mut rx = amqp
        .receiver("/devices/edge1/modules/A/messages/events")
        .await
        .unwrap();
    let (mut mqtt, _) = Mqtt::module(&hub, "A", true).await;
    let detached = timeout(WAIT, rx.recv::<Body<Value>>())
        .await
        .expect("the AMQP link ends in time");
    let e = detached.expect_err("the AMQP link is detached");
    assert!(format!("{e:?}").contains("Stolen"), "{e:?}");
    drop(rx);
    drop(amqp);
    // The MQTT connection stays and works.
    mqtt.send(Packet::PingReq).await;
    assert_eq!(mqtt.next().await, Some(Packet::PingResp));
    // MQTT first: a newer AMQP connection of A closes it, and A's inputs go to the AMQP link.
    let mut amqp = hub.connect("A").await;
    assert!(mqtt.next().await.is_none(), "the MQTT connection is closed");
    let mut a_in = amqp
        .receiver("/devices/edge1/modules/A/messages/events")
        .await
        .unwrap();
    let mut b = hub.connect("B").await;
    let mut b_out = b
        .sender("/devices/edge1/modules/B/messages/events")
        .await
        .unwrap();
    timeout(WAIT, b_out.send(amqp_output("back", "after", b"x")))
        .await
        .unwrap()
        .unwrap();
    let d = timeout(WAIT, a_in.recv::<Body<Value>>())
        .await
        .unwrap()
        .unwrap();
    a_in.accept(&d).await.unwrap();
    let core = hub.hub.as_ref().unwrap().core.clone();
    assert!(core.is_connected(&hub.module("A")));
    assert_eq!(core.live_connections(), 2, "A and B, once each");
    amqp.close().await;
    b.close().await;
    hub.stop().await;
}

#[tokio::test]
async fn a_will_goes_out_as_telemetry_when_a_connection_ends_without_disconnect() {
    let hub = start_hub(ROUTES, "{}").await;
    let mut b = hub.connect("B").await;
    let mut b_in = b
        .receiver("/devices/edge1/modules/B/messages/events")
        .await
        .unwrap();
    let with_will = |topic: &str| {
        let mut connect = Connect::new("edge1/A");
        connect.keep_alive = 60;
        connect.login = Some(Login::new(username("A"), module_token(&hub, "A")));
        connect.last_will = Some(LastWill::new(
            topic,
            b"gone".to_vec(),
            QoS::AtLeastOnce,
            false,
        ));
        connect
    };
    let will_topic = "devices/edge1/modules/A/messages/events/%24.on=out1&state=lost";
    // A DISCONNECT drops the will: the next message at B is the one sent after it.
    let (mut a, ack) = Mqtt::connect_with(&hub, Via::Mqtts, with_will(will_topic)).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    a.send(Packet::Disconnect).await;
    assert!(a.next().await.is_none());
    let (mut a, _) = Mqtt::connect_with(&hub, Via::Mqtts, with_will(will_topic)).await;
    a.publish1(
        "devices/edge1/modules/A/messages/events/%24.on=out1&%24.mid=marker",
        b"m",
    )
    .await;
    let m = next_at(&mut b_in).await;
    assert_eq!(
        m.properties.as_ref().unwrap().message_id,
        Some("marker".to_owned().into())
    );
    assert_eq!(app_property(&m, "iothub-MessageType"), None);
    // The client vanishes (no DISCONNECT): its will arrives, marked as IoT Hub marks it.
    drop(a);
    let will = next_at(&mut b_in).await;
    assert_eq!(body_bytes(&will), b"gone");
    assert_eq!(
        app_property(&will, "iothub-MessageType").as_deref(),
        Some("Will")
    );
    assert_eq!(app_property(&will, "state").as_deref(), Some("lost"));
    // A connection replaced by a newer one of the same client sends its will too.
    let (_a, _) = Mqtt::connect_with(&hub, Via::Mqtts, with_will(will_topic)).await;
    let (_a2, _) = Mqtt::module(&hub, "A", true).await;
    let will = next_at(&mut b_in).await;
    assert_eq!(
        app_property(&will, "iothub-MessageType").as_deref(),
        Some("Will")
    );
    // A will on a topic that is not the client's telemetry is refused with CONNACK 5.
    for topic in [
        "devices/edge1/modules/B/messages/events/",
        "$iothub/twin/GET/?$rid=1",
    ] {
        let (mut c, ack) = Mqtt::connect_with(&hub, Via::Mqtts, with_will(topic)).await;
        assert_eq!(ack.code, ConnectReturnCode::NotAuthorized, "{topic}");
        assert!(c.next().await.is_none());
    }
    b.close().await;
    hub.stop().await;
}

/// The next message at an AMQP receiver, accepted.
async fn next_at(rx: &mut fe2o3_amqp::Receiver) -> Message<Body<Value>> {
    let d = timeout(WAIT, rx.recv::<Body<Value>>())
        .await
        .unwrap()
        .unwrap();
    rx.accept(&d).await.unwrap();
    d.into_message()
}

/// Module inputs over MQTT leave their queue on the module's PUBACK, and only then: what the
/// module acknowledged (even in the write that ends its connection) never comes again; what it
/// did not comes again on its next connection, marked DUP, before newer messages.
#[tokio::test]
async fn inputs_leave_on_their_puback_and_unacknowledged_ones_come_again() {
    let routes = r#"{"r": "FROM /messages/modules/A/outputs/out1 INTO BrokeredEndpoint(\"/modules/B/inputs/in1\")"}"#;
    let hub = start_hub(routes, "{}").await;
    let inputs = "devices/edge1/modules/B/inputs/#";
    let out = "devices/edge1/modules/A/messages/events/%24.on=out1";
    let (mut a, _) = Mqtt::module(&hub, "A", true).await;
    let (mut b, _) = Mqtt::module(&hub, "B", true).await;
    b.subscribe(inputs, QoS::AtLeastOnce).await;
    let names = |r: std::ops::Range<u32>| r.map(|i| format!("m{i}")).collect::<Vec<_>>();
    for name in names(0..10) {
        a.publish1(out, name.as_bytes()).await;
    }
    let mut got = Vec::new();
    for _ in 0..10 {
        got.push(b.publish_in().await);
    }
    let texts = |ps: &[Publish]| {
        let mut t: Vec<String> = ps
            .iter()
            .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
            .collect();
        t.sort_by_key(|s| s[1..].parse::<u32>().unwrap());
        t
    };
    assert_eq!(texts(&got), names(0..10));
    assert!(got.iter().all(|p| !p.dup && p.qos == QoS::AtLeastOnce));
    // The first four acknowledged in the same write as the DISCONNECT: they are handled
    // together with the end of the connection.
    for p in &got[..4] {
        b.tx.feed(Packet::PubAck(PubAck::new(p.pkid)))
            .await
            .unwrap();
    }
    b.send(Packet::Disconnect).await;
    drop(b);

    let (mut b, _) = Mqtt::module(&hub, "B", true).await;
    b.subscribe(inputs, QoS::AtLeastOnce).await;
    let mut again = Vec::new();
    for _ in 0..6 {
        again.push(b.publish_in().await);
    }
    assert_eq!(texts(&again), texts(&got[4..]));
    assert!(again.iter().all(|p| p.dup), "redeliveries are marked DUP");
    for p in &again {
        b.tx.feed(Packet::PubAck(PubAck::new(p.pkid)))
            .await
            .unwrap();
    }
    b.tx.flush().await.unwrap();
    // Nothing acknowledged comes again: the next message is a new one.
    a.publish1(out, b"m10").await;
    let next = b.publish_in().await;
    assert_eq!((next.payload.as_ref(), next.dup), (&b"m10"[..], false));
    b.tx.feed(Packet::PubAck(PubAck::new(next.pkid)))
        .await
        .unwrap();
    b.send(Packet::Disconnect).await;
    drop(b);

    let (mut b, _) = Mqtt::module(&hub, "B", true).await;
    b.subscribe(inputs, QoS::AtLeastOnce).await;
    a.publish1(out, b"m11").await;
    let next = b.publish_in().await;
    assert_eq!((next.payload.as_ref(), next.dup), (&b"m11"[..], false));
    hub.stop().await;
}

/// A child edge hub connects its own clients over MQTT on their behalf: client id and username
/// name the client, `auth-chain` runs from it to the child, and the password is the child's
/// `$edgeHub` token (as the C# SDK's `ClientAuthenticationForEdgeHubOnBehalfOf` connects).
#[tokio::test]
async fn a_child_hub_connects_its_clients_with_an_auth_chain_and_its_own_token() {
    use edgehub::model::identity::{DeviceId, KeySlot};
    let extra = r#""devices": {"child": {"edge": true}, "other": {"edge": true}, "leaf": {}},"#;
    let hub = start_hub_https(ROUTES, extra).await;
    let parent_key = device_key(&hub.settings).unwrap();
    let edge_hub = ModuleId::parse("$edgeHub").unwrap();
    let edge_hub_token = |child: &str| {
        let d = DeviceId::parse(child).unwrap();
        let key = parent_key
            .derive_device_key(&d, KeySlot::Primary)
            .derive_module_key(&d, &edge_hub, KeySlot::Primary);
        make_token(
            &resource_for(IOTHUB, &Identity::Module(d, edge_hub.clone())),
            &key,
            now_secs() + 3600,
            None,
        )
    };
    let child = edge_hub_token("child");
    let user = |client: &str, chain: Option<&str>| {
        let mut u = format!("{IOTHUB}/{client}/?api-version=2020-09-30&DeviceClientType=test");
        if let Some(c) = chain {
            u.push_str("&auth-chain=");
            u.push_str(
                &percent_encoding::utf8_percent_encode(c, percent_encoding::NON_ALPHANUMERIC)
                    .to_string(),
            );
        }
        u
    };
    // On behalf of its module, then the module publishes as itself.
    let (mut c, ack) = Mqtt::connect_as(
        &hub,
        "child/sensor",
        &user("child/sensor", Some("child/sensor;child")),
        &child,
        60,
        true,
    )
    .await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    c.publish1("devices/child/modules/sensor/messages/events/", b"up")
        .await;
    // On behalf of itself (the device), as the chain's single hop.
    let (_, ack) = Mqtt::connect_as(
        &hub,
        "child",
        &user("child", Some("child;child")),
        &child,
        60,
        true,
    )
    .await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    // Refused: another child's token, a chain that does not end at the token's hub or does
    // not start at the client, a device outside its scope, and the token without a chain.
    let refused: [(&str, Option<&str>, String); 5] = [
        (
            "child/sensor",
            Some("child/sensor;child"),
            edge_hub_token("other"),
        ),
        ("child/sensor", Some("child/sensor;other"), child.clone()),
        ("child/sensor", Some("child/other;child"), child.clone()),
        ("leaf", Some("leaf;child"), child.clone()),
        ("child/sensor", None, child.clone()),
    ];
    for (client, chain, token) in refused {
        let (_, ack) = Mqtt::connect_as(&hub, client, &user(client, chain), &token, 60, true).await;
        assert_eq!(
            ack.code,
            ConnectReturnCode::NotAuthorized,
            "{client} {chain:?}"
        );
    }
    hub.stop().await;
}
