//! The identity registry of the service API, against a real hub: IoT Hub's rules for create,
//! read, list, replace and delete (statuses, error codes, etags, generated keys), identities of
//! the config file left alone, bounds, persistence across a restart, and the effect on
//! connections: a created identity connects at once with the keys it was given, a disabled or
//! deleted one loses its links with `amqp:unauthorized-access` and cannot connect again.

#![allow(clippy::unwrap_used, reason = "tests fail on any unexpected error")]

mod common;

use common::{start_hub_https, start_hub_https_limits, TestHub, IOTHUB, WAIT};
use edgehub::model::identity::{DeviceId, Identity, Key, ModuleId};
use fe2o3_amqp::types::{
    messaging::{Body, Message},
    primitives::Value,
};
use serde_json::{json, Value as Json};
use tokio::time::timeout;

const SERVICE_KEY: &str = "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=";
const EXTRA: &str = r#""servicePolicies": {"service": {"primaryKey": "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA="}},
    "devices": {"leaf": {}, "child": {"edge": true}},"#;
const ROUTES: &str = r#"{
    "toM3": "FROM /messages/modules/A/outputs/out1 INTO BrokeredEndpoint(\"/modules/M3/inputs/in1\")"
}"#;

fn token() -> String {
    edgehub::model::sas::make_token(
        IOTHUB,
        &Key::from_base64(SERVICE_KEY).unwrap(),
        edgehub::model::sas::now_secs() + 3600,
        Some("service"),
    )
}

async fn call(
    hub: &TestHub,
    method: &str,
    path: &str,
    if_match: Option<&str>,
    body: &Json,
) -> common::HttpsReply {
    let t = token();
    let mut headers = vec![
        ("Authorization", t.as_str()),
        ("Content-Type", "application/json; charset=utf-8"),
    ];
    if let Some(m) = if_match {
        headers.push(("If-Match", m));
    }
    let text = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    hub.https(
        method,
        &format!("{path}?api-version=2021-04-12"),
        &headers,
        &text,
    )
    .await
}

/// What `Registry.create({deviceId})` sends once the SDK normalised it.
fn new_device(id: &str) -> Json {
    json!({"deviceId": id, "authentication": {"type": "sas", "symmetricKey": {"primaryKey": "", "secondaryKey": ""}}})
}

fn error_code(r: &common::HttpsReply) -> String {
    let m = r.body["Message"].as_str().unwrap_or_default();
    m.strip_prefix("ErrorCode:")
        .and_then(|m| m.split(';').next())
        .unwrap_or_default()
        .to_owned()
}

fn key_of(device: &Json) -> Key {
    Key::from_base64(
        device["authentication"]["symmetricKey"]["primaryKey"]
            .as_str()
            .unwrap(),
    )
    .unwrap()
}

fn device(id: &str) -> Identity {
    Identity::Device(DeviceId::parse(id).unwrap())
}

async fn connect(
    hub: &TestHub,
    id: &Identity,
    key: &Key,
) -> Result<edgehub::client::Client, edgehub::client::ClientError> {
    let ca = hub.settings.data_dir.join("certs").join("edge-ca.pem");
    timeout(
        WAIT,
        edgehub::client::Client::connect(
            hub.hub.as_ref().unwrap().amqps_addr,
            "localhost",
            &ca,
            IOTHUB,
            id,
            key,
        ),
    )
    .await
    .expect("connect in time")
}

/// Waits for the hub to end `rx` and checks the condition it gave.
async fn closed_unauthorized(rx: &mut fe2o3_amqp::Receiver) {
    use fe2o3_amqp::link::{LinkStateError, RecvError};
    let err = timeout(WAIT, rx.recv::<Body<Value>>())
        .await
        .expect("the hub closes the link in time")
        .expect_err("no message, an error");
    match err {
        RecvError::LinkStateError(LinkStateError::RemoteDetachedWithError(e))
        | RecvError::LinkStateError(LinkStateError::RemoteClosedWithError(e)) => assert_eq!(
            e.condition,
            fe2o3_amqp::types::definitions::AmqpError::UnauthorizedAccess.into()
        ),
        other => panic!("unexpected: {other:?}"),
    }
}

#[tokio::test]
async fn devices_follow_iot_hub_rules() {
    let hub = start_hub_https("{}", EXTRA).await;

    // Create: keys generated, enabled, an etag and a generation id.
    let r = call(&hub, "PUT", "/devices/dev1", None, &new_device("dev1")).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let created = r.body.clone();
    assert_eq!(created["deviceId"], "dev1");
    assert_eq!(created["status"], "enabled");
    assert_eq!(created["connectionState"], "Disconnected");
    assert_eq!(created["authentication"]["type"], "sas");
    assert_eq!(key_of(&created).as_bytes().len(), 32);
    assert_ne!(
        created["authentication"]["symmetricKey"]["primaryKey"],
        created["authentication"]["symmetricKey"]["secondaryKey"]
    );
    let etag = created["etag"].as_str().unwrap().to_owned();
    assert!(created["generationId"]
        .as_str()
        .is_some_and(|g| g.len() == 18));

    // Again, in any case: 409.
    for id in ["dev1", "DEV1"] {
        let r = call(
            &hub,
            "PUT",
            &format!("/devices/{id}"),
            None,
            &new_device(id),
        )
        .await;
        assert_eq!(
            (r.status, error_code(&r)),
            (409, "DeviceAlreadyExists".into()),
            "{id}"
        );
    }
    let r = call(&hub, "GET", "/devices/dev1", None, &Json::Null).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, created);

    // Update: a stale etag is 412, the current one or "*" applies; empty keys are kept.
    let mut disabled = new_device("dev1");
    disabled["status"] = "disabled".into();
    let r = call(
        &hub,
        "PUT",
        "/devices/dev1",
        Some("\"bm90IGl0\""),
        &disabled,
    )
    .await;
    assert_eq!(
        (r.status, error_code(&r)),
        (412, "PreconditionFailed".into())
    );
    let r = call(
        &hub,
        "PUT",
        "/devices/dev1",
        Some(&format!("\"{etag}\"")),
        &disabled,
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["status"], "disabled");
    assert_ne!(r.body["etag"], created["etag"]);
    assert_eq!(r.body["generationId"], created["generationId"]);
    assert_eq!(r.body["authentication"], created["authentication"]);
    let r = call(
        &hub,
        "PUT",
        "/devices/dev1",
        Some("\"*\""),
        &new_device("dev1"),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body["status"], "disabled",
        "status is kept when not given"
    );
    let r = call(
        &hub,
        "PUT",
        "/devices/nobody",
        Some("\"*\""),
        &new_device("nobody"),
    )
    .await;
    assert_eq!((r.status, error_code(&r)), (404, "DeviceNotFound".into()));

    // List: config devices (this edge device too) and the registry's.
    for path in ["/devices", "/devices/"] {
        let r = call(&hub, "GET", path, None, &Json::Null).await;
        assert_eq!(r.status, 200);
        let ids: Vec<&str> = r
            .body
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["deviceId"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["child", "edge1", "leaf", "dev1"], "{path}");
        let edge1 = &r.body[1];
        assert_eq!(edge1["capabilities"]["iotEdge"], true);
    }

    // Config identities are read like the others and never changed.
    let r = call(&hub, "GET", "/devices/leaf", None, &Json::Null).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["status"], "enabled");
    let r = call(&hub, "PUT", "/devices/leaf", None, &new_device("leaf")).await;
    assert_eq!(
        (r.status, error_code(&r)),
        (409, "DeviceAlreadyExists".into())
    );
    let r = call(
        &hub,
        "PUT",
        "/devices/leaf",
        Some("\"*\""),
        &new_device("leaf"),
    )
    .await;
    assert_eq!(
        (r.status, error_code(&r)),
        (409, "IdentityDefinedInConfigFile".into())
    );
    let r = call(&hub, "DELETE", "/devices/leaf", Some("\"*\""), &Json::Null).await;
    assert_eq!(
        (r.status, error_code(&r)),
        (409, "IdentityDefinedInConfigFile".into())
    );
    assert!(r.body["Message"].as_str().unwrap().contains("config file"));

    // Delete: a stale etag is 412, then 204, then 404.
    let r = call(
        &hub,
        "DELETE",
        "/devices/dev1",
        Some("\"bm90IGl0\""),
        &Json::Null,
    )
    .await;
    assert_eq!(r.status, 412);
    let r = call(&hub, "DELETE", "/devices/dev1", Some("\"*\""), &Json::Null).await;
    assert_eq!(r.status, 204);
    for method in ["GET", "DELETE"] {
        let r = call(&hub, method, "/devices/dev1", Some("\"*\""), &Json::Null).await;
        assert_eq!(
            (r.status, error_code(&r)),
            (404, "DeviceNotFound".into()),
            "{method}"
        );
    }
    // Re-created: a new generation and keys, and the old etag does not match it.
    let r = call(&hub, "PUT", "/devices/dev1", None, &new_device("dev1")).await;
    assert_eq!(r.status, 200);
    assert_ne!(r.body["generationId"], created["generationId"]);
    assert_ne!(r.body["authentication"], created["authentication"]);
    let r = call(
        &hub,
        "DELETE",
        "/devices/dev1",
        Some(&format!("\"{etag}\"")),
        &Json::Null,
    )
    .await;
    assert_eq!(r.status, 412);
    hub.stop().await;
}

#[tokio::test]
async fn malformed_requests_are_refused_with_their_status() {
    let hub = start_hub_https("{}", EXTRA).await;
    let t = token();
    let auth = [("Authorization", t.as_str())];
    let cases: [(&str, &str, &str, u16); 9] = [
        ("PUT", "/devices/d1", "{not json", 400),
        ("PUT", "/devices/d1", "[1, 2]", 400),
        ("PUT", "/devices/d1", r#"{"deviceId": "d2"}"#, 400),
        (
            "PUT",
            "/devices/d1",
            r#"{"deviceId": "d1", "status": "sleeping"}"#,
            400,
        ),
        (
            "PUT",
            "/devices/d1",
            r#"{"deviceId": "d1", "authentication": {"type": "sas", "symmetricKey": {"primaryKey": "!!"}}}"#,
            400,
        ),
        ("PUT", "/devices/a%20b", r#"{"deviceId": "a b"}"#, 400),
        (
            "PUT",
            "/devices/edge1/modules/$mine",
            r#"{"deviceId": "edge1", "moduleId": "$mine"}"#,
            400,
        ),
        ("POST", "/devices/d1", "{}", 405),
        ("PATCH", "/devices/", "{}", 405),
    ];
    for (method, path, body, status) in cases {
        let r = hub.https(method, path, &auth, body).await;
        assert_eq!(r.status, status, "{method} {path} {body}: {:?}", r.body);
    }
    let big = format!(
        r#"{{"deviceId": "d1", "statusReason": "{}"}}"#,
        "x".repeat(20_000)
    );
    let r = hub.https("PUT", "/devices/d1", &auth, &big).await;
    assert_eq!(r.status, 413);
    // No token, or a device token: 401.
    let r = hub.https("GET", "/devices", &[], "").await;
    assert_eq!(r.status, 401);
    // Nothing was created by any of these.
    let r = call(&hub, "GET", "/devices/d1", None, &Json::Null).await;
    assert_eq!(r.status, 404);
    hub.stop().await;
}

#[tokio::test]
async fn modules_on_the_edge_device_and_on_leaf_devices() {
    let hub = start_hub_https(ROUTES, EXTRA).await;
    let body = |d: &str, m: &str| json!({"deviceId": d, "moduleId": m});
    let r = call(
        &hub,
        "PUT",
        "/devices/edge1/modules/M3",
        None,
        &body("edge1", "M3"),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["moduleId"], "M3");
    assert_eq!(r.body["authentication"]["type"], "sas");
    let m3 = r.body.clone();
    let r = call(
        &hub,
        "PUT",
        "/devices/edge1/modules/M3",
        None,
        &body("edge1", "M3"),
    )
    .await;
    assert_eq!(
        (r.status, error_code(&r)),
        (409, "ModuleAlreadyExistsOnDevice".into())
    );
    let r = call(
        &hub,
        "PUT",
        "/devices/edge1/modules/A",
        None,
        &body("edge1", "A"),
    )
    .await;
    assert_eq!(r.status, 409);
    let r = call(
        &hub,
        "PUT",
        "/devices/nodev/modules/x",
        None,
        &body("nodev", "x"),
    )
    .await;
    assert_eq!((r.status, error_code(&r)), (404, "DeviceNotFound".into()));
    let r = call(
        &hub,
        "PUT",
        "/devices/child/modules/x",
        None,
        &body("child", "x"),
    )
    .await;
    assert_eq!(
        r.status, 400,
        "a child edge device's modules are its own hub's"
    );
    let r = call(
        &hub,
        "PUT",
        "/devices/leaf/modules/lm",
        None,
        &body("leaf", "lm"),
    )
    .await;
    assert_eq!(r.status, 200);

    let r = call(&hub, "GET", "/devices/edge1/modules", None, &Json::Null).await;
    let ids: Vec<&str> = r
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["moduleId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["$edgeHub", "A", "B", "M3"]);
    let r = call(&hub, "GET", "/devices/edge1/modules/M3", None, &Json::Null).await;
    assert_eq!(r.body, m3);
    let r = call(
        &hub,
        "GET",
        "/devices/edge1/modules/nope",
        None,
        &Json::Null,
    )
    .await;
    assert_eq!((r.status, error_code(&r)), (404, "ModuleNotFound".into()));
    let r = call(
        &hub,
        "DELETE",
        "/devices/edge1/modules/A",
        Some("\"*\""),
        &Json::Null,
    )
    .await;
    assert_eq!(
        (r.status, error_code(&r)),
        (409, "IdentityDefinedInConfigFile".into())
    );

    // A registry module connects with its key and gets what the routes send it.
    let mut a = hub.connect("A").await;
    let mut m = connect(&hub, &hub.module("M3"), &key_of(&m3))
        .await
        .unwrap();
    let mut rx = m
        .receiver("/devices/edge1/modules/M3/messages/events")
        .await
        .unwrap();
    let mut tx = a
        .sender("/devices/edge1/modules/A/messages/events")
        .await
        .unwrap();
    let out = Message::builder()
        .properties(fe2o3_amqp::types::messaging::Properties {
            message_id: Some(String::from("m-1").into()),
            ..Default::default()
        })
        .application_properties(
            fe2o3_amqp::types::messaging::ApplicationProperties::builder()
                .insert("iothub-outputname", "out1")
                .build(),
        )
        .body(Body::<Value>::Data(
            vec![fe2o3_amqp::types::messaging::Data(
                fe2o3_amqp::types::primitives::Binary::from(b"hello".to_vec()),
            )]
            .into(),
        ))
        .build();
    timeout(WAIT, tx.send(out)).await.unwrap().unwrap();
    let got = timeout(WAIT, rx.recv::<Body<Value>>())
        .await
        .unwrap()
        .unwrap();
    rx.accept(&got).await.unwrap();
    let got = got.into_message();
    assert_eq!(
        got.properties.and_then(|p| p.message_id),
        Some(String::from("m-1").into())
    );

    // Deleting the device of a registry module takes the module; deleting the module cuts it.
    let r = call(
        &hub,
        "DELETE",
        "/devices/edge1/modules/M3",
        Some("\"*\""),
        &Json::Null,
    )
    .await;
    assert_eq!(r.status, 204);
    closed_unauthorized(&mut rx).await;
    assert!(connect(&hub, &hub.module("M3"), &key_of(&m3))
        .await
        .is_err());
    hub.stop().await;
}

#[tokio::test]
async fn a_created_device_connects_at_once_and_disable_or_delete_cuts_it_off() {
    let hub = start_hub_https("{}", EXTRA).await;
    let r = call(&hub, "PUT", "/devices/dev2", None, &new_device("dev2")).await;
    assert_eq!(r.status, 200);
    let key = key_of(&r.body);
    let id = device("dev2");

    let mut c = connect(&hub, &id, &key)
        .await
        .expect("a created device connects at once");
    let mut rx = c
        .receiver("/devices/dev2/messages/devicebound")
        .await
        .unwrap();
    let r = call(&hub, "GET", "/devices/dev2", None, &Json::Null).await;
    assert_eq!(r.body["connectionState"], "Connected");

    let mut disabled = new_device("dev2");
    disabled["status"] = "disabled".into();
    let r = call(&hub, "PUT", "/devices/dev2", Some("\"*\""), &disabled).await;
    assert_eq!(r.status, 200);
    closed_unauthorized(&mut rx).await;
    match connect(&hub, &id, &key).await {
        Err(edgehub::client::ClientError::Refused(401, why)) => {
            assert!(why.contains("disabled"), "{why}")
        }
        other => panic!("a disabled device must not connect: {:?}", other.err()),
    }

    let mut enabled = new_device("dev2");
    enabled["status"] = "enabled".into();
    let r = call(&hub, "PUT", "/devices/dev2", Some("\"*\""), &enabled).await;
    assert_eq!(r.status, 200);
    let mut c = connect(&hub, &id, &key)
        .await
        .expect("enabled again, it connects with the same key");
    let mut rx = c
        .receiver("/devices/dev2/messages/devicebound")
        .await
        .unwrap();
    let r = call(&hub, "DELETE", "/devices/dev2", Some("\"*\""), &Json::Null).await;
    assert_eq!(r.status, 204);
    closed_unauthorized(&mut rx).await;
    assert!(connect(&hub, &id, &key).await.is_err());

    // New keys (an update that gives them) cut the connections of the old ones.
    let r = call(&hub, "PUT", "/devices/dev3", None, &new_device("dev3")).await;
    let old = key_of(&r.body);
    let mut c = connect(&hub, &device("dev3"), &old).await.unwrap();
    let mut rx = c
        .receiver("/devices/dev3/messages/devicebound")
        .await
        .unwrap();
    let fresh = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [7u8; 32]);
    let rekey = json!({"deviceId": "dev3", "authentication": {"type": "sas", "symmetricKey": {"primaryKey": fresh, "secondaryKey": fresh}}});
    let r = call(&hub, "PUT", "/devices/dev3", Some("\"*\""), &rekey).await;
    assert_eq!(r.status, 200);
    closed_unauthorized(&mut rx).await;
    assert!(connect(&hub, &device("dev3"), &old).await.is_err());
    assert!(
        connect(&hub, &device("dev3"), &Key::from_base64(&fresh).unwrap())
            .await
            .is_ok()
    );
    hub.stop().await;
}

#[tokio::test]
async fn the_registry_survives_a_restart_and_is_bounded() {
    let mut hub = start_hub_https_limits("{}", EXTRA, r#"{"maxRegistryIdentities": 2}"#).await;
    let r = call(&hub, "PUT", "/devices/keep", None, &new_device("keep")).await;
    assert_eq!(r.status, 200);
    let kept = r.body.clone();
    let r = call(
        &hub,
        "PUT",
        "/devices/keep/modules/mod1",
        None,
        &json!({"deviceId": "keep", "moduleId": "mod1"}),
    )
    .await;
    assert_eq!(r.status, 200);
    let module = r.body.clone();
    let r = call(&hub, "PUT", "/devices/third", None, &new_device("third")).await;
    assert_eq!(
        (r.status, error_code(&r)),
        (403, "IotHubQuotaExceeded".into())
    );

    hub.restart().await;
    let r = call(&hub, "GET", "/devices/keep", None, &Json::Null).await;
    assert_eq!(r.body, kept);
    let r = call(&hub, "GET", "/devices/keep/modules/mod1", None, &Json::Null).await;
    assert_eq!(r.body, module);
    assert!(connect(&hub, &device("keep"), &key_of(&kept)).await.is_ok());
    let m = Identity::Module(
        DeviceId::parse("keep").unwrap(),
        ModuleId::parse("mod1").unwrap(),
    );
    assert!(connect(&hub, &m, &key_of(&module)).await.is_ok());
    assert!(hub.scrape().await.contains("edgehub_registry_identities{"));

    // A device's delete takes its modules, also after a restart.
    let r = call(&hub, "DELETE", "/devices/keep", Some("\"*\""), &Json::Null).await;
    assert_eq!(r.status, 204);
    hub.restart().await;
    let r = call(&hub, "GET", "/devices/keep/modules/mod1", None, &Json::Null).await;
    assert_eq!((r.status, error_code(&r)), (404, "DeviceNotFound".into()));
    let r = call(&hub, "PUT", "/devices/third", None, &new_device("third")).await;
    assert_eq!(r.status, 200, "room again");
    hub.stop().await;
}

/// A self-signed client certificate for `cn`, and its SHA-1 thumbprint as IoT Hub shows it.
fn self_signed(cn: &str) -> (edgehub::client::ClientCert, String) {
    let k = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2049, 1, 1);
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let c = p.self_signed(&k).unwrap();
    let thumbprint = edgehub::model::x509::Thumbprint::sha1_hex(c.der());
    let cert = edgehub::client::ClientCert {
        chain: vec![c.der().clone()],
        key: rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(
            k.serialize_der(),
        )),
    };
    (cert, thumbprint)
}

async fn connect_x509(
    hub: &TestHub,
    cert: edgehub::client::ClientCert,
) -> Result<edgehub::client::Client, edgehub::client::ClientError> {
    let ca = hub.settings.data_dir.join("certs").join("edge-ca.pem");
    timeout(
        WAIT,
        edgehub::client::Client::connect_x509(
            hub.hub.as_ref().unwrap().amqps_addr,
            "localhost",
            &ca,
            cert,
            false,
        ),
    )
    .await
    .expect("connect in time")
}

/// A registry device with `selfSigned` thumbprints connects with its certificate at once (no
/// token), and is cut off when disabled; a certificate of another thumbprint proves nothing.
#[tokio::test]
async fn a_registry_device_with_a_thumbprint_connects_by_certificate() {
    let hub = start_hub_https("{}", EXTRA).await;
    let (cert, thumbprint) = self_signed("anything");
    let body = json!({"deviceId": "cam1", "authentication": {"type": "selfSigned",
        "x509Thumbprint": {"primaryThumbprint": thumbprint.to_ascii_lowercase(), "secondaryThumbprint": null}}});
    let r = call(&hub, "PUT", "/devices/cam1", None, &body).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["authentication"]["type"], "selfSigned");
    assert_eq!(
        r.body["authentication"]["x509Thumbprint"]["primaryThumbprint"],
        thumbprint.as_str()
    );
    assert!(r.body["authentication"]["symmetricKey"]["primaryKey"].is_null());

    let mut c = connect_x509(&hub, clone_cert(&cert)).await.unwrap();
    let mut rx = c
        .receiver("/devices/cam1/messages/devicebound")
        .await
        .unwrap();
    let (other, _) = self_signed("cam1");
    let mut stranger = connect_x509(&hub, other).await.unwrap();
    let mut refused = stranger
        .receiver("/devices/cam1/messages/devicebound")
        .await
        .unwrap();
    closed_unauthorized(&mut refused).await;

    let mut disabled = body.clone();
    disabled["status"] = "disabled".into();
    let r = call(&hub, "PUT", "/devices/cam1", Some("\"*\""), &disabled).await;
    assert_eq!(r.status, 200);
    closed_unauthorized(&mut rx).await;
    let mut again = connect_x509(&hub, cert).await.unwrap();
    let mut rx = again
        .receiver("/devices/cam1/messages/devicebound")
        .await
        .unwrap();
    closed_unauthorized(&mut rx).await;
    hub.stop().await;
}

fn clone_cert(c: &edgehub::client::ClientCert) -> edgehub::client::ClientCert {
    edgehub::client::ClientCert {
        chain: c.chain.clone(),
        key: c.key.clone_key(),
    }
}

/// A C2D message for `device`, as the service SDK sends it.
fn c2d_to(device: &str, id: &str) -> Message<Body<Value>> {
    Message::builder()
        .properties(fe2o3_amqp::types::messaging::Properties {
            message_id: Some(id.to_owned().into()),
            to: Some(format!("/devices/{device}/messages/devicebound")),
            ..Default::default()
        })
        .body(Body::Data(
            vec![fe2o3_amqp::types::messaging::Data(
                fe2o3_amqp::types::primitives::Binary::from(id.as_bytes().to_vec()),
            )]
            .into(),
        ))
        .build()
}

#[tokio::test]
async fn a_deleted_device_takes_its_c2d_messages_with_it() {
    use fe2o3_amqp::types::messaging::{MessageId, Outcome};
    let hub = start_hub_https("{}", EXTRA).await;
    let ca = hub.settings.data_dir.join("certs").join("edge-ca.pem");
    let mut svc = timeout(
        WAIT,
        edgehub::client::Client::connect_service(
            hub.hub.as_ref().unwrap().amqps_addr,
            "localhost",
            &ca,
            IOTHUB,
            "service",
            &Key::from_base64(SERVICE_KEY).unwrap(),
        ),
    )
    .await
    .expect("connect in time")
    .expect("service token accepted");
    let mut tx = svc.sender("/messages/devicebound").await.unwrap();
    let mut send = async |device: &str, id: &str| {
        let outcome = timeout(WAIT, tx.send(c2d_to(device, id)))
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(outcome, Outcome::Accepted(_)), "{outcome:?}");
    };

    let r = call(&hub, "PUT", "/devices/dev5", None, &new_device("dev5")).await;
    assert_eq!(r.status, 200);
    send("dev5", "before-delete").await;
    let r = call(&hub, "DELETE", "/devices/dev5", Some("\"*\""), &Json::Null).await;
    assert_eq!(r.status, 204);

    // Created again with the same id, the device receives only what was sent since.
    let r = call(&hub, "PUT", "/devices/dev5", None, &new_device("dev5")).await;
    assert_eq!(r.status, 200);
    let key = key_of(&r.body);
    send("dev5", "after-create").await;
    let mut c = connect(&hub, &device("dev5"), &key).await.unwrap();
    let mut rx = c
        .receiver("/devices/dev5/messages/devicebound")
        .await
        .unwrap();
    let d = timeout(WAIT, rx.recv::<Body<Value>>())
        .await
        .expect("a message in time")
        .unwrap();
    let mid = d.message().properties.as_ref().unwrap().message_id.clone();
    assert_eq!(mid, Some(MessageId::String("after-create".into())));
    rx.accept(&d).await.unwrap();
    hub.stop().await;
}

/// A call of a child hub's `$edgeHub` (its `token`) to `/devices/{actor}/modules/$edgeHub/{op}`.
async fn edge_hub_call(
    hub: &TestHub,
    actor: &str,
    op: &str,
    token: &str,
    body: &Json,
) -> common::HttpsReply {
    hub.https(
        "POST",
        &format!("/devices/{actor}/modules/%24edgeHub/{op}?api-version=2020-06-30-preview"),
        &[
            ("Authorization", token),
            ("Content-Type", "application/json"),
        ],
        &body.to_string(),
    )
    .await
}

/// A token for `id` signed with `key`, as the SDKs make it.
fn identity_token(id: &Identity, key: &Key) -> String {
    edgehub::model::sas::make_token(
        &edgehub::model::sas::resource_for(IOTHUB, id),
        key,
        edgehub::model::sas::now_secs() + 3600,
        None,
    )
}

fn ids_of(page: &Json) -> Vec<String> {
    let mut out: Vec<String> = page["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["deviceId"].as_str().unwrap().to_owned())
        .collect();
    out.extend(page["modules"].as_array().unwrap().iter().map(|m| {
        format!(
            "{}/{}",
            m["deviceId"].as_str().unwrap(),
            m["moduleId"].as_str().unwrap()
        )
    }));
    out.sort();
    out
}

#[tokio::test]
async fn a_registry_edge_device_is_a_child_hub_until_disabled_or_deleted() {
    use edgehub::model::identity::KeySlot;
    let hub = start_hub_https("{}", EXTRA).await;
    let mut body = new_device("hub2");
    body["capabilities"] = json!({"iotEdge": true});
    let r = call(&hub, "PUT", "/devices/hub2", None, &body).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let hub2 = r.body.clone();
    let scope = format!(
        "ms-azure-iot-edge://hub2-{}",
        hub2["generationId"].as_str().unwrap()
    );
    assert_eq!(hub2["deviceScope"], scope.as_str());
    // Its parent is this hub, as for the config's child edge devices.
    let own = call(&hub, "GET", "/devices/edge1", None, &Json::Null).await;
    assert_eq!(hub2["parentScopes"], json!([own.body["deviceScope"]]));
    let r = call(
        &hub,
        "PUT",
        "/devices/leaf7",
        None,
        &json!({"deviceId": "leaf7", "parentScopes": [scope]}),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);

    // Its $edgeHub holds the key a child hub derives from its device key.
    let (d, edge_hub) = (
        DeviceId::parse("hub2").unwrap(),
        ModuleId::parse("$edgeHub").unwrap(),
    );
    let edge_hub_id = Identity::Module(d.clone(), edge_hub.clone());
    let derived = key_of(&hub2).derive_module_key(&d, &edge_hub, KeySlot::Primary);
    let token = identity_token(&edge_hub_id, &derived);
    let r = edge_hub_call(
        &hub,
        "hub2",
        "devicesAndModulesInTargetDeviceScope",
        &token,
        &json!({"authChain": "hub2"}),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        ids_of(&r.body),
        ["hub2", "hub2/$edgeAgent", "hub2/$edgeHub", "leaf7"]
    );
    assert!(r.body["continuationLink"].is_null());
    let r = edge_hub_call(
        &hub,
        "hub2",
        "getDeviceAndModuleOnBehalfOf",
        &token,
        &json!({"authChain": "hub2", "targetDeviceId": "leaf7"}),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(ids_of(&r.body), ["leaf7"]);

    // Connected as its $edgeHub, it acts for its modules and for the leaf under its scope.
    let mut c = connect(&hub, &edge_hub_id, &derived)
        .await
        .expect("the child hub connects");
    for target in ["devices/hub2/modules/sensor", "devices/leaf7"] {
        timeout(
            WAIT,
            edgehub::client::put_token(&mut c.session, &format!("{IOTHUB}/{target}"), &token),
        )
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("on behalf of {target}: {e:?}"));
    }
    let mut own_twin = c
        .receiver("/devices/hub2/modules/$edgeHub/twin")
        .await
        .unwrap();
    let mut sensor_twin = c
        .receiver("/devices/hub2/modules/sensor/twin")
        .await
        .unwrap();
    let mut leaf_c2d = c
        .receiver("/devices/leaf7/messages/devicebound")
        .await
        .unwrap();
    // Not for a leaf outside its scope.
    let refused = timeout(
        WAIT,
        edgehub::client::put_token(&mut c.session, &format!("{IOTHUB}/devices/leaf"), &token),
    )
    .await
    .unwrap();
    assert!(
        matches!(refused, Err(edgehub::client::ClientError::Refused(401, _))),
        "{refused:?}"
    );

    // Disabled: its connections end, its scope is closed to it; enabled again, it connects.
    let mut disabled = body.clone();
    disabled["status"] = "disabled".into();
    let r = call(&hub, "PUT", "/devices/hub2", Some("\"*\""), &disabled).await;
    assert_eq!(r.status, 200);
    closed_unauthorized(&mut own_twin).await;
    closed_unauthorized(&mut sensor_twin).await;
    // The leaf it connected on behalf goes with it.
    closed_unauthorized(&mut leaf_c2d).await;
    assert!(connect(&hub, &edge_hub_id, &derived).await.is_err());
    let r = edge_hub_call(
        &hub,
        "hub2",
        "devicesAndModulesInTargetDeviceScope",
        &token,
        &json!({"authChain": "hub2"}),
    )
    .await;
    assert_eq!(r.status, 401, "{:?}", r.body);
    let mut enabled = body.clone();
    enabled["status"] = "enabled".into();
    let r = call(&hub, "PUT", "/devices/hub2", Some("\"*\""), &enabled).await;
    assert_eq!(r.status, 200);
    let mut c = connect(&hub, &edge_hub_id, &derived)
        .await
        .expect("enabled again");
    let mut own_twin = c
        .receiver("/devices/hub2/modules/$edgeHub/twin")
        .await
        .unwrap();
    // Deleted: the same, and its leaf is no one's.
    let r = call(&hub, "DELETE", "/devices/hub2", Some("\"*\""), &Json::Null).await;
    assert_eq!(r.status, 204);
    closed_unauthorized(&mut own_twin).await;
    assert!(connect(&hub, &edge_hub_id, &derived).await.is_err());
    hub.stop().await;
}

#[tokio::test]
async fn a_child_hubs_runtime_manages_its_modules_through_the_parent() {
    use edgehub::model::identity::KeySlot;
    let hub = start_hub_https("{}", EXTRA).await;
    let edge = |id: &str| {
        let mut b = new_device(id);
        b["capabilities"] = json!({"iotEdge": true});
        b
    };
    let r = call(&hub, "PUT", "/devices/hub2", None, &edge("hub2")).await;
    assert_eq!(r.status, 200);
    let hub2_key = key_of(&r.body);
    let r = call(&hub, "PUT", "/devices/hub3", None, &edge("hub3")).await;
    let hub3_key = key_of(&r.body);
    let d = DeviceId::parse("hub2").unwrap();
    let edge_hub = ModuleId::parse("$edgeHub").unwrap();
    let derived = hub2_key.derive_module_key(&d, &edge_hub, KeySlot::Primary);
    let token = identity_token(&Identity::Module(d.clone(), edge_hub.clone()), &derived);
    let keys = |b: u8| {
        let k = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [b; 32]);
        json!({"type": "sas", "symmetricKey": {"primaryKey": k, "secondaryKey": k}})
    };

    // putModuleOnBehalfOf (POST as IoT Hub takes it, PUT as edgeHub's controller does).
    let module = json!({"deviceId": "hub2", "moduleId": "filter", "managedBy": "IotEdge", "authentication": keys(1)});
    let r = edge_hub_call(
        &hub,
        "hub2",
        "putModuleOnBehalfOf",
        &token,
        &json!({"authChain": "hub2", "module": module}),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["moduleId"], "filter");
    assert_eq!(
        r.body["authentication"],
        call(
            &hub,
            "GET",
            "/devices/hub2/modules/filter",
            None,
            &Json::Null
        )
        .await
        .body["authentication"]
    );
    let etag = r.body["etag"].as_str().unwrap().to_owned();
    let mut updated = module.clone();
    updated["authentication"] = keys(2);
    let r = hub
        .https(
            "PUT",
            "/devices/hub2/modules/%24edgeHub/putModuleOnBehalfOf?api-version=2020-06-30-preview",
            &[
                ("Authorization", token.as_str()),
                ("If-Match", &format!("\"{etag}\"")),
            ],
            &json!({"authChain": "hub2", "module": updated}).to_string(),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        r.body["authentication"]["symmetricKey"],
        keys(2)["symmetricKey"]
    );
    // Again without If-Match: the module exists.
    let r = edge_hub_call(
        &hub,
        "hub2",
        "putModuleOnBehalfOf",
        &token,
        &json!({"authChain": "hub2", "module": module}),
    )
    .await;
    assert_eq!(
        (r.status, error_code(&r)),
        (409, "ModuleAlreadyExistsOnDevice".into())
    );
    // The auth chain's target must be the module's device.
    let mut elsewhere = module.clone();
    elsewhere["deviceId"] = "hub3".into();
    let r = edge_hub_call(
        &hub,
        "hub2",
        "putModuleOnBehalfOf",
        &token,
        &json!({"authChain": "hub2", "module": elsewhere}),
    )
    .await;
    assert_eq!(r.status, 400, "{:?}", r.body);

    let r = edge_hub_call(
        &hub,
        "hub2",
        "getModuleOnBehalfOf",
        &token,
        &json!({"authChain": "hub2", "targetModuleId": "filter"}),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["deviceId"], "hub2");
    let r = edge_hub_call(
        &hub,
        "hub2",
        "getModulesOnTargetDevice",
        &token,
        &json!({"authChain": "hub2"}),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let listed: Vec<&str> = r
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["moduleId"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["filter"]);

    // Another child hub sees nothing of hub2's.
    let hub3_token = identity_token(
        &Identity::Module(DeviceId::parse("hub3").unwrap(), edge_hub.clone()),
        &hub3_key.derive_module_key(
            &DeviceId::parse("hub3").unwrap(),
            &edge_hub,
            KeySlot::Primary,
        ),
    );
    for chain in ["hub2", "hub2;hub3"] {
        let r = edge_hub_call(
            &hub,
            "hub3",
            "getModulesOnTargetDevice",
            &hub3_token,
            &json!({"authChain": chain}),
        )
        .await;
        assert_eq!(r.status, 401, "{chain}: {:?}", r.body);
    }
    // hub2's token is not hub3's.
    let r = edge_hub_call(
        &hub,
        "hub3",
        "getModulesOnTargetDevice",
        &token,
        &json!({"authChain": "hub3"}),
    )
    .await;
    assert_eq!(r.status, 401, "{:?}", r.body);

    // The runtime of hub2 writes its own $edgeHub with its device token (as its identity
    // service does); from then on that key is $edgeHub's and the derived one is not.
    let device_token = identity_token(&device("hub2"), &hub2_key);
    let own_edge_hub = json!({"deviceId": "hub2", "moduleId": "$edgeHub", "managedBy": "iotEdge", "authentication": keys(3)});
    let r = hub
        .https(
            "PUT",
            "/devices/hub2/modules/%24edgeHub?api-version=2017-11-08-preview",
            &[
                ("Authorization", device_token.as_str()),
                ("Content-Type", "application/json"),
            ],
            &own_edge_hub.to_string(),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = edge_hub_call(
        &hub,
        "hub2",
        "getModulesOnTargetDevice",
        &token,
        &json!({"authChain": "hub2"}),
    )
    .await;
    assert_eq!(
        r.status, 401,
        "the derived key is no longer $edgeHub's: {:?}",
        r.body
    );
    let new_key =
        Key::from_base64(keys(3)["symmetricKey"]["primaryKey"].as_str().unwrap()).unwrap();
    let token = identity_token(&Identity::Module(d.clone(), edge_hub.clone()), &new_key);
    let r = edge_hub_call(
        &hub,
        "hub2",
        "devicesAndModulesInTargetDeviceScope",
        &token,
        &json!({"authChain": "hub2"}),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        ids_of(&r.body),
        ["hub2", "hub2/$edgeAgent", "hub2/$edgeHub", "hub2/filter"]
    );
    let served = r.body["modules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["moduleId"] == "$edgeHub")
        .unwrap()
        .clone();
    assert_eq!(
        served["authentication"]["symmetricKey"],
        keys(3)["symmetricKey"]
    );
    // A device token reaches its own device's modules only, and writes no other identity.
    let r = hub
        .https(
            "GET",
            "/devices/hub3/modules?api-version=2017-11-08-preview",
            &[("Authorization", device_token.as_str())],
            "",
        )
        .await;
    assert_eq!(r.status, 401, "{:?}", r.body);
    let r = hub
        .https(
            "GET",
            "/devices/hub2?api-version=2017-11-08-preview",
            &[("Authorization", device_token.as_str())],
            "",
        )
        .await;
    assert_eq!(r.status, 401, "{:?}", r.body);

    let r = edge_hub_call(
        &hub,
        "hub2",
        "deleteModuleOnBehalfOf",
        &token,
        &json!({"authChain": "hub2", "moduleId": "filter"}),
    )
    .await;
    assert_eq!(r.status, 204, "{:?}", r.body);
    let r = edge_hub_call(
        &hub,
        "hub2",
        "getModuleOnBehalfOf",
        &token,
        &json!({"authChain": "hub2", "targetModuleId": "filter"}),
    )
    .await;
    assert_eq!((r.status, error_code(&r)), (404, "ModuleNotFound".into()));
    hub.stop().await;
}
