//! X.509 client authentication: devices with a thumbprint or a CA-signed certificate connect
//! without `$cbs`, over AMQPS and over WebSockets; certificates that match nothing give no
//! identity and the links are refused with `amqp:unauthorized-access`.

#![allow(clippy::unwrap_used, reason = "tests fail on any error")]

mod common;

use common::{start_hub_https, TestHub, WAIT};
use edgehub::{
    client::{Client, ClientCert},
    model::message::CONNECTION_DEVICE_ID,
    model::x509::Thumbprint,
};
use fe2o3_amqp::{
    link::{LinkStateError, RecvError},
    types::{
        messaging::{annotations::OwnedKey, Body, Message, Outcome, Properties},
        primitives::{Symbol, Value},
    },
};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::time::timeout;

const VALID: ((i32, u8, u8), (i32, u8, u8)) = ((2024, 1, 1), (2049, 1, 1));

fn params(cn: &str, (from, to): ((i32, u8, u8), (i32, u8, u8))) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.not_before = rcgen::date_time_ymd(from.0, from.1, from.2);
    p.not_after = rcgen::date_time_ymd(to.0, to.1, to.2);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p
}

/// A client CA written to `dir/client-ca.pem`, and the certificates it signs.
struct Pki {
    ca: rcgen::Certificate,
    key: KeyPair,
    path: std::path::PathBuf,
}

impl Pki {
    fn new(dir: &std::path::Path) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut p = params("devices CA", VALID);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.extended_key_usages.clear();
        let ca = p.self_signed(&key).unwrap();
        let path = dir.join("client-ca.pem");
        std::fs::write(&path, ca.pem()).unwrap();
        Self { ca, key, path }
    }

    fn signed(&self, cn: &str, validity: ((i32, u8, u8), (i32, u8, u8))) -> ClientCert {
        let k = KeyPair::generate().unwrap();
        let c = params(cn, validity)
            .signed_by(&k, &self.ca, &self.key)
            .unwrap();
        cert(c, k)
    }
}

fn self_signed(cn: &str, validity: ((i32, u8, u8), (i32, u8, u8))) -> ClientCert {
    let k = KeyPair::generate().unwrap();
    let c = params(cn, validity).self_signed(&k).unwrap();
    cert(c, k)
}

fn cert(c: rcgen::Certificate, k: KeyPair) -> ClientCert {
    ClientCert {
        chain: vec![c.der().clone()],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(k.serialize_der())),
    }
}

fn clone(c: &ClientCert) -> ClientCert {
    ClientCert {
        chain: c.chain.clone(),
        key: c.key.clone_key(),
    }
}

const ROUTES: &str =
    r#"{"all": "FROM /messages/* INTO BrokeredEndpoint(\"/modules/B/inputs/in1\")"}"#;

/// The expired self-signed certificate whose thumbprint `oldie` has (the same every time).
fn expired() -> ClientCert {
    static EXPIRED: std::sync::OnceLock<(Vec<u8>, Vec<u8>)> = std::sync::OnceLock::new();
    let (der, key) = EXPIRED.get_or_init(|| {
        let k = KeyPair::generate().unwrap();
        let c = params("oldie", ((2020, 1, 1), (2021, 1, 1)))
            .self_signed(&k)
            .unwrap();
        (c.der().to_vec(), k.serialize_der())
    });
    ClientCert {
        chain: vec![der.clone().into()],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.clone())),
    }
}

/// A hub with `selfie` (thumbprints of `thumb`, SHA-1, and of `thumb256`, SHA-256), `oldie`
/// (the thumbprint of an expired certificate), `cadev` and `cadev2` (CA-signed), and `keyonly`
/// (no x509).
async fn hub(pki: &Pki, thumb: &ClientCert, thumb256: &ClientCert) -> TestHub {
    let sha256: String = ring::digest::digest(&ring::digest::SHA256, &thumb256.chain[0])
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let extra = format!(
        r#""devices": {{
            "selfie": {{"x509": {{"primaryThumbprint": "{}", "secondaryThumbprint": "{sha256}"}}}},
            "oldie": {{"x509": {{"primaryThumbprint": "{}"}}}},
            "cadev": {{"x509": {{"ca": true}}}},
            "cadev2": {{"x509": {{"ca": true}}}},
            "keyonly": {{}}
        }},
        "tls": {{"clientCaCerts": "{}"}},"#,
        Thumbprint::sha1_hex(&thumb.chain[0]),
        Thumbprint::sha1_hex(&expired().chain[0]),
        pki.path.display()
    );
    start_hub_https(ROUTES, &extra).await
}

async fn connect(hub: &TestHub, cert: ClientCert, ws: bool) -> Client {
    let h = hub.hub.as_ref().unwrap();
    let addr = if ws {
        h.https_addr.unwrap()
    } else {
        h.amqps_addr
    };
    let ca = hub.settings.data_dir.join("certs").join("edge-ca.pem");
    timeout(WAIT, Client::connect_x509(addr, "localhost", &ca, cert, ws))
        .await
        .expect("connect in time")
        .expect("connect")
}

fn telemetry(id: &str) -> Message<Body<Value>> {
    Message::builder()
        .properties(Properties {
            message_id: Some(id.to_owned().into()),
            ..Default::default()
        })
        .body(Body::Value(fe2o3_amqp::types::messaging::AmqpValue(
            Value::String(id.to_owned()),
        )))
        .build()
}

#[tokio::test]
async fn devices_authenticate_with_thumbprints_or_ca_signed_certificates() {
    let dir = std::env::temp_dir().join(format!("edgehub-x509-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let pki = Pki::new(&dir);
    let thumb = self_signed("anything", VALID);
    let thumb256 = self_signed("anything else", VALID);
    let hub = hub(&pki, &thumb, &thumb256).await;
    let mut b = hub.connect("B").await;
    let mut rx = b
        .receiver("/devices/edge1/modules/B/messages/events")
        .await
        .unwrap();
    let cases = [
        ("selfie", clone(&thumb)),
        ("selfie", clone(&thumb256)),
        ("cadev", pki.signed("cadev", VALID)),
        ("cadev2", pki.signed("CADEV2", VALID)),
    ];
    for (device, cert) in cases {
        for ws in [false, true] {
            let mut c = connect(&hub, clone(&cert), ws).await;
            let mut tx = c
                .sender(&format!("/devices/{device}/messages/events"))
                .await
                .unwrap();
            let id = format!("{device}-{ws}");
            let o = timeout(WAIT, tx.send(telemetry(&id)))
                .await
                .unwrap()
                .unwrap();
            assert!(matches!(o, Outcome::Accepted(_)), "{id}: {o:?}");
            let d = timeout(WAIT, rx.recv::<Body<Value>>())
                .await
                .unwrap()
                .unwrap();
            rx.accept(&d).await.unwrap();
            let m = d.message();
            assert_eq!(
                m.properties.as_ref().unwrap().message_id,
                Some(id.clone().into())
            );
            let from = m
                .message_annotations
                .as_ref()
                .unwrap()
                .0
                .get(&OwnedKey::Symbol(Symbol::from(CONNECTION_DEVICE_ID)))
                .cloned();
            assert_eq!(from, Some(Value::String(device.to_owned())), "{id}");
            c.close().await;
        }
    }
    b.close().await;
    hub.stop().await;
    std::fs::remove_dir_all(dir).unwrap();
}

/// Attaches a C2D receiver for `device` and returns the error the hub closes it with.
async fn refused(c: &mut Client, device: &str) -> String {
    let mut rx = c
        .receiver(&format!("/devices/{device}/messages/devicebound"))
        .await
        .unwrap();
    let err = timeout(WAIT, rx.recv::<Body<Value>>())
        .await
        .expect("the hub closes the link in time")
        .expect_err("no message, an error");
    match err {
        RecvError::LinkStateError(LinkStateError::RemoteDetachedWithError(e))
        | RecvError::LinkStateError(LinkStateError::RemoteClosedWithError(e)) => {
            format!("{:?}", e.condition)
        }
        other => format!("{other:?}"),
    }
}

#[tokio::test]
async fn certificates_that_match_nothing_get_no_identity() {
    let dir = std::env::temp_dir().join(format!("edgehub-x509-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let pki = Pki::new(&dir);
    let thumb = self_signed("anything", VALID);
    let thumb256 = self_signed("anything else", VALID);
    let hub = hub(&pki, &thumb, &thumb256).await;
    let other_dir = dir.join("other");
    std::fs::create_dir_all(&other_dir).unwrap();
    let other_pki = Pki::new(&other_dir);
    let cases = [
        (
            "expired",
            "cadev",
            pki.signed("cadev", ((2020, 1, 1), (2021, 1, 1))),
        ),
        (
            "not yet valid",
            "cadev",
            pki.signed("cadev", ((2040, 1, 1), (2049, 1, 1))),
        ),
        ("CN of another device", "cadev", pki.signed("cadev2", VALID)),
        (
            "CN of a device without x509",
            "keyonly",
            pki.signed("keyonly", VALID),
        ),
        (
            "signed by another CA",
            "cadev",
            other_pki.signed("cadev", VALID),
        ),
        (
            "self-signed with a CA device's CN",
            "cadev",
            self_signed("cadev", VALID),
        ),
        ("unknown thumbprint", "selfie", self_signed("selfie", VALID)),
        ("expired, known thumbprint", "oldie", expired()),
    ];
    for (what, device, cert) in cases {
        for ws in [false, true] {
            let mut c = connect(&hub, clone(&cert), ws).await;
            let condition = refused(&mut c, device).await;
            assert!(
                condition.contains("UnauthorizedAccess"),
                "{what} (ws {ws}): {condition}"
            );
            c.close().await;
        }
    }
    // A certificate that matches nothing does not stop the connection from putting a token.
    let mut c = connect(&hub, self_signed("nobody", VALID), false).await;
    let key = edgehub::app::device_key(&hub.settings).unwrap();
    let keys = edgehub::core::auth::module_keys(
        &hub.settings,
        &key,
        &edgehub::model::identity::ModuleId::parse("A").unwrap(),
    );
    let resource = edgehub::model::sas::resource_for(common::IOTHUB, &hub.module("A"));
    let token = edgehub::model::sas::make_token(
        &resource,
        &keys.primary,
        edgehub::model::sas::now_secs() + 600,
        None,
    );
    edgehub::client::put_token(&mut c.session, &resource, &token)
        .await
        .unwrap();
    let mut tx = c
        .sender("/devices/edge1/modules/A/messages/events")
        .await
        .unwrap();
    let o = timeout(WAIT, tx.send(telemetry("after-token")))
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(o, Outcome::Accepted(_)), "{o:?}");
    c.close().await;
    let metrics = hub.scrape().await;
    assert!(metrics.contains("certificate_not_accepted"), "{metrics}");
    hub.stop().await;
    std::fs::remove_dir_all(dir).unwrap();
}
