//! `start_hub()`: a real hub in this process on 127.0.0.1 port 0, its own data directory,
//! stopped and cleaned up on drop.

#![allow(dead_code, reason = "each test binary uses part of the helpers")]
#![allow(
    clippy::unwrap_used,
    reason = "test helpers fail the test on any error"
)]

use std::{collections::HashMap, path::PathBuf, time::Duration};

use edgehub::{
    app::{device_key, Hub},
    client::Client,
    config,
    core::auth::module_keys,
    model::identity::{DeviceId, Identity, ModuleId},
};

pub const IOTHUB: &str = "test-hub.azure-devices.net";
pub const WAIT: Duration = Duration::from_secs(20);

/// What the HTTPS API answered.
#[derive(Debug)]
pub struct HttpsReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: serde_json::Value,
}

impl HttpsReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

pub struct TestHub {
    pub hub: Option<Hub>,
    pub dir: PathBuf,
    pub settings: config::Settings,
}

/// Starts a hub with modules `A` and `B` and the given `$edgeHub.routes` (JSON object text).
pub async fn start_hub(routes: &str, limits: &str) -> TestHub {
    start_hub_with(routes, limits, r#"{"timeToLiveSecs": 7200}"#).await
}

/// Like `start_hub`, with the `storeAndForwardConfiguration` given (JSON object text).
pub async fn start_hub_with(routes: &str, limits: &str, store_and_forward: &str) -> TestHub {
    let dir = std::env::temp_dir().join(format!("edgehub-test-{}", uuid::Uuid::new_v4()));
    start(dir, routes, limits, store_and_forward).await
}

/// Like `start_hub`, with its data directory under `parent`.
pub async fn start_hub_in(parent: &std::path::Path, routes: &str) -> TestHub {
    let dir = parent.join(format!("edgehub-test-{}", uuid::Uuid::new_v4()));
    start(dir, routes, "{}", r#"{"timeToLiveSecs": 7200}"#).await
}

/// Like `start_hub`, with the HTTPS API on port 0 and `extra` top-level config members (text
/// such as `"devices": {…}, "servicePolicies": {…},`).
pub async fn start_hub_https(routes: &str, extra: &str) -> TestHub {
    let dir = std::env::temp_dir().join(format!("edgehub-test-{}", uuid::Uuid::new_v4()));
    start_config(
        dir,
        routes,
        "{}",
        r#"{"timeToLiveSecs": 7200}"#,
        r#""127.0.0.1:0""#,
        extra,
    )
    .await
}

/// Like `start_hub_https`, with the given `limits` (JSON object text).
pub async fn start_hub_https_limits(routes: &str, extra: &str, limits: &str) -> TestHub {
    let dir = std::env::temp_dir().join(format!("edgehub-test-{}", uuid::Uuid::new_v4()));
    start_config(
        dir,
        routes,
        limits,
        r#"{"timeToLiveSecs": 7200}"#,
        r#""127.0.0.1:0""#,
        extra,
    )
    .await
}

/// Like `start_hub_with`, with `extra` top-level config members (see `start_hub_https`).
pub async fn start_hub_extra(routes: &str, store_and_forward: &str, extra: &str) -> TestHub {
    let dir = std::env::temp_dir().join(format!("edgehub-test-{}", uuid::Uuid::new_v4()));
    start_config(dir, routes, "{}", store_and_forward, "null", extra).await
}

async fn start(dir: PathBuf, routes: &str, limits: &str, store_and_forward: &str) -> TestHub {
    start_config(dir, routes, limits, store_and_forward, "null", "").await
}

async fn start_config(
    dir: PathBuf,
    routes: &str,
    limits: &str,
    store_and_forward: &str,
    https: &str,
    extra: &str,
) -> TestHub {
    let text = format!(
        r#"{{
            "deviceId": "edge1",
            "iothubHostname": "{IOTHUB}",
            "gatewayHostname": "localhost",
            "listen": {{"amqps": "127.0.0.1:0", "mqtts": "127.0.0.1:0", "https": {https}, "metrics": "127.0.0.1:0"}},
            "dataDir": "{}",
            {extra}
            "limits": {limits},
            "modules": {{"A": {{}}, "B": {{}}}},
            "$edgeHub": {{"schemaVersion": "1.1", "routes": {routes}, "storeAndForwardConfiguration": {store_and_forward}}}
        }}"#,
        dir.join("data").display()
    );
    let settings = config::from_str(&text, &HashMap::new()).expect("test config");
    let hub = tokio::time::timeout(WAIT, Hub::start(settings.clone()))
        .await
        .expect("hub start in time")
        .expect("hub starts");
    TestHub {
        hub: Some(hub),
        dir,
        settings,
    }
}

impl TestHub {
    pub fn module(&self, m: &str) -> Identity {
        Identity::Module(
            DeviceId::parse("edge1").unwrap(),
            ModuleId::parse(m).unwrap(),
        )
    }

    pub async fn connect(&self, m: &str) -> Client {
        let key = device_key(&self.settings).unwrap();
        let keys = module_keys(&self.settings, &key, &ModuleId::parse(m).unwrap());
        let hub = self.hub.as_ref().unwrap();
        let ca = self.settings.data_dir.join("certs").join("edge-ca.pem");
        tokio::time::timeout(
            WAIT,
            Client::connect(
                hub.amqps_addr,
                "localhost",
                &ca,
                IOTHUB,
                &self.module(m),
                &keys.primary,
            ),
        )
        .await
        .expect("connect in time")
        .expect("connect")
    }

    /// Like `connect`, over AMQP over WebSockets on the HTTPS listener.
    pub async fn connect_ws(&self, m: &str) -> Client {
        let key = device_key(&self.settings).unwrap();
        let keys = module_keys(&self.settings, &key, &ModuleId::parse(m).unwrap());
        let hub = self.hub.as_ref().unwrap();
        let ca = self.settings.data_dir.join("certs").join("edge-ca.pem");
        tokio::time::timeout(
            WAIT,
            Client::connect_ws(
                hub.https_addr.expect("https is on"),
                "localhost",
                &ca,
                IOTHUB,
                &self.module(m),
                &keys.primary,
            ),
        )
        .await
        .expect("connect in time")
        .expect("connect")
    }

    /// One HTTPS request to the hub's API (trusting its CA, as `localhost`); returns the status,
    /// the headers (names lower-cased) and the body parsed as JSON (`Null` when empty).
    pub async fn https(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> HttpsReply {
        tokio::time::timeout(WAIT, self.https_inner(method, path, headers, body))
            .await
            .expect("HTTPS request in time")
    }

    /// A TLS connection to the HTTPS API, trusting the hub's CA, as `localhost`.
    pub async fn https_stream(&self) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        use std::sync::Arc;
        let addr = self.hub.as_ref().unwrap().https_addr.expect("https is on");
        let ca = std::fs::read(self.settings.data_dir.join("certs").join("edge-ca.pem")).unwrap();
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
        .with_root_certificates(roots)
        .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .unwrap()
    }

    async fn https_inner(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> HttpsReply {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tls = self.https_stream().await;
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (k, v) in headers {
            request.push_str(&format!("{k}: {v}\r\n"));
        }
        request.push_str("\r\n");
        request.push_str(body);
        tls.write_all(request.as_bytes()).await.unwrap();
        // Read the head, then exactly Content-Length bytes of body.
        let mut buf = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = tls.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed before the response head");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .expect("status line");
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let length: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .map(|(_, v)| v.parse().unwrap())
            .unwrap_or(0);
        while buf.len() < head_end + length {
            let n = tls.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed inside the body");
            buf.extend_from_slice(&chunk[..n]);
        }
        let body = &buf[head_end..head_end + length];
        let body = if body.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(body).expect("a JSON body")
        };
        HttpsReply {
            status,
            headers,
            body,
        }
    }

    pub async fn scrape(&self) -> String {
        let addr = self.hub.as_ref().unwrap().metrics_addr.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        tokio::time::timeout(WAIT, s.read_to_string(&mut out))
            .await
            .unwrap()
            .unwrap();
        out
    }

    /// Shuts the hub down and starts it again on the same settings and data.
    pub async fn restart(&mut self) {
        if let Some(h) = self.hub.take() {
            tokio::time::timeout(WAIT, h.shutdown())
                .await
                .expect("shutdown in time");
        }
        let hub = tokio::time::timeout(WAIT, Hub::start(self.settings.clone()))
            .await
            .expect("hub start in time")
            .expect("hub starts");
        self.hub = Some(hub);
    }

    pub async fn stop(mut self) {
        if let Some(h) = self.hub.take() {
            tokio::time::timeout(WAIT, h.shutdown())
                .await
                .expect("shutdown in time");
        }
    }
}

impl Drop for TestHub {
    fn drop(&mut self) {
        if let Some(h) = self.hub.take() {
            h.shutdown_token().cancel();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
