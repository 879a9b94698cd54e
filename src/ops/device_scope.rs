//! The device-scope API client: this hub's identities (modules, leaf devices, nested edge
//! devices, with their keys) from its parent, over HTTPS, as edgeHub's
//! `NestedDeviceScopeApiClient` fetches them:
//!
//! * `POST /devices/{own}/modules/$edgeHub/devicesAndModulesInTargetDeviceScope` with
//!   `{"pageSize", "continuationLink", "authChain"}`, breadth first: the own scope first
//!   (`authChain` = own device id), then the scope of every nested edge device found
//!   (`"child1;edge1"`), and another page for a non-empty `continuationLink`;
//! * `POST /devices/{own}/modules/$edgeHub/getDeviceAndModuleOnBehalfOf` with
//!   `{"targetDeviceId", "targetModuleId", "authChain"}` for one identity.
//!
//! `Authorization` is a `$edgeHub` token in edgeHub's HTTPS encoding (ids encoded twice, see
//! [`workload::service_sr`]), signed through the workload API, valid an hour and reused until
//! half of that is left. The parent's certificate is checked against the trust bundle.
//! 400/401/403/404 mean "not in scope" ([`FetchError::Gone`]); anything else is transient.
//! Bounds: [`CALL_TIMEOUT`] per call, [`MAX_PAGES`] pages per refresh, [`MAX_BODY`] per answer.

use std::{collections::VecDeque, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

use crate::{
    core::scope::{FetchError, FetchFuture, ScopeEntry, ScopeSource},
    model::identity::{DeviceId, Identity, ModuleId},
    ops::workload::{self, Workload},
};

pub const API_VERSION: &str = "2020-06-30-preview";
/// edgeHub's page size.
const PAGE_SIZE: u64 = 10;
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
const MAX_PAGES: usize = 10_000;
const MAX_BODY: usize = 16 * 1024 * 1024;
const TOKEN_LIFETIME_SECS: u64 = 3600;

/// The client for one parent.
pub struct DeviceScopeClient {
    host: String,
    port: u16,
    own: DeviceId,
    iothub_host: String,
    edge_hub: ModuleId,
    workload: Workload,
    tls: tokio_rustls::TlsConnector,
    /// The current `Authorization` token and its expiry.
    token: tokio::sync::Mutex<Option<(String, u64)>>,
    /// The HTTP proxy the calls tunnel through (`CONNECT`), as edgeHub sends its HTTPS calls
    /// through `https_proxy`.
    proxy: Option<crate::config::Proxy>,
}

/// A byte stream to the parent: TCP, or a proxy's tunnel.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}

impl DeviceScopeClient {
    /// `trust_bundle`: the PEM certificates the parent's certificate must chain to.
    pub fn new(
        host: &str,
        port: u16,
        own: DeviceId,
        iothub_host: &str,
        workload: Workload,
        trust_bundle: &str,
    ) -> Result<Self, String> {
        use rustls::pki_types::{pem::PemObject, CertificateDer};
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(trust_bundle.as_bytes()) {
            let c = c.map_err(|e| format!("trust bundle: {e}"))?;
            roots
                .add(c)
                .map_err(|e| format!("trust bundle: unusable certificate: {e}"))?;
        }
        if roots.is_empty() {
            return Err("the trust bundle holds no certificate".into());
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(Self {
            host: host.to_owned(),
            port,
            own,
            iothub_host: iothub_host.to_owned(),
            edge_hub: ModuleId::parse("$edgeHub").map_err(|e| e.to_string())?,
            workload,
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            token: tokio::sync::Mutex::new(None),
            proxy: None,
        })
    }

    /// Sends every call through `proxy` (when given).
    pub fn with_proxy(mut self, proxy: Option<crate::config::Proxy>) -> Self {
        self.proxy = proxy;
        self
    }

    async fn authorization(&self) -> Result<String, FetchError> {
        let now = crate::model::sas::now_secs();
        let mut cached = self.token.lock().await;
        if let Some((t, expiry)) = cached.as_ref() {
            if *expiry > now + TOKEN_LIFETIME_SECS / 2 {
                return Ok(t.clone());
            }
        }
        let expiry = now + TOKEN_LIFETIME_SECS;
        let sr = workload::service_sr(&self.iothub_host, &self.own, &self.edge_hub);
        let token = self
            .workload
            .token(&sr, expiry)
            .await
            .map_err(|e| FetchError::Transient(e.to_string()))?;
        *cached = Some((token.clone(), expiry));
        Ok(token)
    }

    /// One POST to `/devices/{own}/modules/$edgeHub/{op}`.
    async fn post(&self, op: &str, body: Value) -> Result<Value, FetchError> {
        tokio::time::timeout(CALL_TIMEOUT, self.post_inner(op, body))
            .await
            .unwrap_or_else(|_| {
                Err(FetchError::Transient(format!(
                    "{op}: no answer within {} s",
                    CALL_TIMEOUT.as_secs()
                )))
            })
    }

    async fn post_inner(&self, op: &str, body: Value) -> Result<Value, FetchError> {
        let transient = |why: String| FetchError::Transient(format!("{op}: {why}"));
        let authorization = self.authorization().await?;
        let path = format!(
            "/devices/{}/modules/%24edgeHub/{op}?api-version={API_VERSION}",
            percent_encoding::utf8_percent_encode(
                self.own.as_str(),
                crate::model::sas::URI_COMPONENT
            )
        );
        let tcp: Box<dyn Io> = match &self.proxy {
            Some(proxy) => Box::new(
                crate::ops::proxy::tunnel(proxy, &self.host, self.port)
                    .await
                    .map_err(|e| transient(e.to_string()))?,
            ),
            None => Box::new(
                tokio::net::TcpStream::connect((self.host.as_str(), self.port))
                    .await
                    .map_err(|e| {
                        transient(format!("connecting to {}:{}: {e}", self.host, self.port))
                    })?,
            ),
        };
        let name = rustls::pki_types::ServerName::try_from(self.host.clone())
            .map_err(|e| transient(format!("{}: {e}", self.host)))?;
        let tls = self
            .tls
            .connect(name, tcp)
            .await
            .map_err(|e| transient(format!("TLS to {}: {e}", self.host)))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| transient(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let request = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(hyper::header::HOST, format!("{}:{}", self.host, self.port))
            .header(hyper::header::AUTHORIZATION, authorization)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| transient(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| transient(e.to_string()))?;
        let status = response.status();
        let bytes = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| transient(format!("reading the answer: {e}")))?
            .to_bytes();
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if !status.is_success() {
            let text = value
                .get("ErrorMessage")
                .or_else(|| value.get("message"))
                .or_else(|| value.get("Message"))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .chars()
                .take(200)
                .collect::<String>();
            let why = format!("{op}: HTTP {status} {text}");
            return Err(match status {
                StatusCode::BAD_REQUEST
                | StatusCode::UNAUTHORIZED
                | StatusCode::FORBIDDEN
                | StatusCode::NOT_FOUND => FetchError::Gone(why),
                _ => FetchError::Transient(why),
            });
        }
        if !value.is_object() {
            return Err(transient("the answer is not a JSON object".into()));
        }
        Ok(value)
    }

    /// One page of this hub's own scope (`edgehub check`): how many identities it holds.
    pub async fn probe(&self) -> Result<usize, FetchError> {
        let body = json!({"pageSize": PAGE_SIZE, "authChain": self.own.as_str()});
        let page = self
            .post("devicesAndModulesInTargetDeviceScope", body)
            .await?;
        Ok(entries(&page, self.own.as_str(), self.own.as_str()).len())
    }

    /// The full walk of the scope tree.
    async fn walk(&self) -> Result<Vec<ScopeEntry>, FetchError> {
        let own = self.own.as_str().to_owned();
        let mut queue: VecDeque<(String, Option<String>)> = VecDeque::from([(own, None)]);
        let mut out = Vec::new();
        let mut pages = 0usize;
        while let Some((chain, link)) = queue.pop_front() {
            pages += 1;
            if pages > MAX_PAGES {
                return Err(FetchError::Transient(format!(
                    "the device scope has more than {MAX_PAGES} pages"
                )));
            }
            let mut body = json!({"pageSize": PAGE_SIZE, "authChain": chain});
            if let Some(l) = &link {
                body["continuationLink"] = Value::String(l.clone());
            }
            let page = self
                .post("devicesAndModulesInTargetDeviceScope", body)
                .await
                .map_err(|e| match e {
                    // The own scope refused is not "everything is gone": keep the cache.
                    FetchError::Gone(why) => FetchError::Transient(why),
                    t => t,
                })?;
            let target = chain.split(';').next().unwrap_or_default().to_owned();
            for entry in entries(&page, &target, &chain) {
                if entry.is_edge() {
                    if let Some(Identity::Device(d)) = entry.id() {
                        if !d.as_str().eq_ignore_ascii_case(&target) {
                            queue.push_back((entry.auth_chain.clone(), None));
                        }
                    }
                }
                out.push(entry);
            }
            if let Some(next) = page
                .get("continuationLink")
                .and_then(Value::as_str)
                .filter(|l| !l.is_empty())
            {
                queue.push_back((chain.clone(), Some(next.to_owned())));
            }
        }
        Ok(out)
    }
}

/// The entries of one answer, each with its auth chain: the target's own is `chain`; another
/// device's is `{device};{chain}`; a module's is `{device}/{module};{its device's chain}`.
fn entries(page: &Value, target: &str, chain: &str) -> Vec<ScopeEntry> {
    let device_chain = |d: &str| {
        if d.eq_ignore_ascii_case(target) {
            chain.to_owned()
        } else {
            format!("{d};{chain}")
        }
    };
    let mut out = Vec::new();
    for (kind, list) in [
        ("devices", page.get("devices")),
        ("modules", page.get("modules")),
    ] {
        for doc in list.and_then(Value::as_array).into_iter().flatten() {
            let Some(d) = doc.get("deviceId").and_then(Value::as_str) else {
                continue;
            };
            let auth_chain = match (kind, doc.get("moduleId").and_then(Value::as_str)) {
                ("modules", Some(m)) => format!("{d}/{m};{}", device_chain(d)),
                ("devices", None) => device_chain(d),
                _ => continue,
            };
            let e = ScopeEntry {
                identity: doc.clone(),
                auth_chain,
            };
            if e.id().is_some() {
                out.push(e);
            }
        }
    }
    out
}

impl ScopeSource for DeviceScopeClient {
    fn full(&self) -> FetchFuture<'_, Vec<ScopeEntry>> {
        Box::pin(self.walk())
    }

    fn one<'a>(&'a self, id: &'a Identity) -> FetchFuture<'a, Vec<ScopeEntry>> {
        self.one_under(id, self.own.as_str())
    }

    fn one_under<'a>(
        &'a self,
        id: &'a Identity,
        edge_chain: &'a str,
    ) -> FetchFuture<'a, Vec<ScopeEntry>> {
        Box::pin(async move {
            let edge = edge_chain.split(';').next().unwrap_or_default();
            let mut body = json!({"targetDeviceId": id.device().as_str(), "authChain": edge_chain});
            if let Some(m) = id.module() {
                body["targetModuleId"] = Value::String(m.as_str().to_owned());
            }
            let page = self.post("getDeviceAndModuleOnBehalfOf", body).await?;
            let found = entries(&page, edge, edge_chain);
            if !found.iter().any(|e| e.id().is_some_and(|f| f.same_as(id))) {
                return Err(FetchError::Gone(format!("{id} is not in the answer")));
            }
            Ok(found)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_chains_follow_the_tree() {
        let page = json!({
            "devices": [
                {"deviceId": "edge1", "capabilities": {"iotEdge": true}},
                {"deviceId": "leaf1"},
                {"deviceId": "child1", "capabilities": {"iotEdge": true}},
                {"moduleId": "stray"}
            ],
            "modules": [
                {"deviceId": "edge1", "moduleId": "$edgeHub"},
                {"deviceId": "edge1", "moduleId": "filter"},
                {"deviceId": "edge1"}
            ],
            "continuationLink": null
        });
        let got: Vec<(String, String)> = entries(&page, "edge1", "edge1")
            .into_iter()
            .map(|e| (e.id().unwrap().to_string(), e.auth_chain))
            .collect();
        assert_eq!(
            got,
            [
                ("edge1", "edge1"),
                ("leaf1", "leaf1;edge1"),
                ("child1", "child1;edge1"),
                ("edge1/$edgeHub", "edge1/$edgeHub;edge1"),
                ("edge1/filter", "edge1/filter;edge1"),
            ]
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
        );
        // A page of a nested scope: chains extend the nested device's own.
        let nested = json!({"devices": [{"deviceId": "child1"}, {"deviceId": "leaf2"}],
                            "modules": [{"deviceId": "child1", "moduleId": "m"}]});
        let got: Vec<String> = entries(&nested, "child1", "child1;edge1")
            .into_iter()
            .map(|e| e.auth_chain)
            .collect();
        assert_eq!(
            got,
            [
                "child1;edge1",
                "leaf2;child1;edge1",
                "child1/m;child1;edge1"
            ]
        );
    }
}
