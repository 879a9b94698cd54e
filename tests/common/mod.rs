//! `start_hub()`: a real hub in this process on 127.0.0.1 port 0, its own data directory,
//! stopped and cleaned up on drop.

#![allow(dead_code, reason = "each test binary uses part of the helpers")]
#![allow(
    clippy::unwrap_used,
    reason = "test helpers fail the test on any error"
)]

use std::{collections::HashMap, path::PathBuf, time::Duration};

use edgehub::{
    auth::module_keys,
    client::Client,
    config,
    hub::{device_key, Hub},
    identity::{DeviceId, Identity, ModuleId},
};

pub const IOTHUB: &str = "test-hub.azure-devices.net";
pub const WAIT: Duration = Duration::from_secs(20);

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

async fn start(dir: PathBuf, routes: &str, limits: &str, store_and_forward: &str) -> TestHub {
    let text = format!(
        r#"{{
            "deviceId": "edge1",
            "iothubHostname": "{IOTHUB}",
            "gatewayHostname": "localhost",
            "listen": {{"amqps": "127.0.0.1:0", "https": null, "metrics": "127.0.0.1:0"}},
            "dataDir": "{}",
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
