//! The IoT Edge workload API client: HTTP/1.1 over the Unix socket named by
//! `IOTEDGE_WORKLOADURI` (or `http://host:port`), `api-version=2020-07-07`, as edgeHub calls it.
//!
//! What the hub asks of it: its server certificate (`certificate/server`, leaf and chain with a
//! PKCS#8 key), the trust bundle (the CAs it presents and trusts upstream), an HMAC-SHA256
//! signature with `$edgeHub`'s primary key for every SAS token it needs (`sign`: the hub holds
//! no key), and `encrypt`/`decrypt` for what it keeps at rest (the device-scope identities).
//!
//! Bounds: at most [`MAX_CONCURRENT`] requests at once (aziot-edged closes the connection of an
//! eleventh without an answer); each request within [`REQUEST_TIMEOUT`]; a 5xx answer or a
//! broken connection is retried [`RETRIES`] times after 1, 2 and 3 s, as edgeHub's client does;
//! an answer body above [`MAX_BODY`] is an error.

use std::{sync::Arc, time::Duration};

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use percent_encoding::utf8_percent_encode;
use serde_json::{json, Value};

use crate::model::identity::{DeviceId, ModuleId};

/// The api-version edgeHub uses on aziot-edged 1.4 and 1.5.
pub const API_VERSION: &str = "2020-07-07";
/// aziot-edged serves at most ten requests of one module at once.
pub const MAX_CONCURRENT: usize = 10;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
const RETRIES: u32 = 3;
const MAX_BODY: usize = 1024 * 1024;
/// The validity edgeHub asks for (aziot-edged ignores it and issues its own, 30 days by default).
const REQUESTED_CERT_DAYS: u64 = 90;

/// Why a workload call failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("workload URI {0:?}: must be unix:///path or http://host:port")]
    BadUri(String),
    #[error("workload API {what}: {why}")]
    Transport { what: &'static str, why: String },
    #[error("workload API {what}: HTTP {status}: {message}")]
    Status {
        what: &'static str,
        status: StatusCode,
        message: String,
    },
    #[error("workload API {what}: unexpected answer: {why}")]
    Answer { what: &'static str, why: String },
}

impl WorkloadError {
    /// Worth another try: the socket or the daemon, not the request.
    fn transient(&self) -> bool {
        match self {
            WorkloadError::Transport { .. } => true,
            WorkloadError::Status { status, .. } => status.is_server_error(),
            _ => false,
        }
    }
}

#[derive(Debug, Clone)]
enum Endpoint {
    Unix(std::path::PathBuf),
    Tcp(String),
}

/// A server certificate from the workload API.
#[derive(Clone)]
pub struct ServerCert {
    /// The leaf followed by its issuers, PEM.
    pub chain_pem: String,
    /// PKCS#8 PEM.
    pub key_pem: String,
    /// The leaf's `notAfter`, Unix seconds.
    pub not_after: u64,
}

impl std::fmt::Debug for ServerCert {
    // The key stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ServerCert(not_after={})", self.not_after)
    }
}

/// The client for one module identity (`$edgeHub` and its generation id).
pub struct WorkloadClient {
    endpoint: Endpoint,
    /// `Host:` header: the last path segment of the socket, as edgeHub sends it.
    host: String,
    module: ModuleId,
    generation_id: String,
    permits: tokio::sync::Semaphore,
}

impl std::fmt::Debug for WorkloadClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WorkloadClient({:?}, {})", self.endpoint, self.module)
    }
}

impl WorkloadClient {
    pub fn new(uri: &str, module: ModuleId, generation_id: &str) -> Result<Self, WorkloadError> {
        let bad = || WorkloadError::BadUri(uri.to_owned());
        let (endpoint, host) = if let Some(path) = uri.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(bad());
            }
            let host = path
                .rsplit('/')
                .next()
                .unwrap_or("workload.sock")
                .to_owned();
            (Endpoint::Unix(path.into()), host)
        } else if let Some(hostport) = uri.strip_prefix("http://") {
            let hostport = hostport.trim_end_matches('/');
            if hostport.is_empty() || hostport.contains('/') {
                return Err(bad());
            }
            (Endpoint::Tcp(hostport.to_owned()), hostport.to_owned())
        } else {
            return Err(bad());
        };
        Ok(Self {
            endpoint,
            host,
            module,
            generation_id: generation_id.to_owned(),
            permits: tokio::sync::Semaphore::new(MAX_CONCURRENT),
        })
    }

    /// `/modules/{url-encoded module}/genid/{genid}/{op}`.
    fn module_path(&self, op: &str) -> String {
        format!(
            "/modules/{}/genid/{}/{op}",
            utf8_percent_encode(self.module.as_str(), crate::model::sas::URI_COMPONENT),
            utf8_percent_encode(&self.generation_id, crate::model::sas::URI_COMPONENT),
        )
    }

    /// HMAC-SHA256 of `data` with the module's primary key; the base64 digest.
    pub async fn sign(&self, data: &[u8]) -> Result<String, WorkloadError> {
        let what = "sign";
        let body = json!({"keyId": "primary", "algo": "HMACSHA256", "data": B64.encode(data)});
        let answer = self
            .call(what, Method::POST, &self.module_path("sign"), Some(body))
            .await?;
        let digest = string_field(what, &answer, "digest")?;
        match B64.decode(digest) {
            Ok(d) if d.len() == 32 => Ok(digest.to_owned()),
            _ => Err(WorkloadError::Answer {
                what,
                why: "digest is not a base64 HMAC-SHA256".into(),
            }),
        }
    }

    /// A SAS token for `resource` (already in the form to sign: the caller chooses the
    /// encoding), valid until `expiry` (Unix seconds), signed through [`sign`](Self::sign).
    pub async fn token(&self, sr: &str, expiry: u64) -> Result<String, WorkloadError> {
        let digest = self.sign(format!("{sr}\n{expiry}").as_bytes()).await?;
        let sig = utf8_percent_encode(&digest, crate::model::sas::URI_COMPONENT);
        Ok(format!(
            "SharedAccessSignature sr={sr}&sig={sig}&se={expiry}"
        ))
    }

    /// The server certificate for `common_name` (the `EdgeDeviceHostName`).
    pub async fn server_cert(&self, common_name: &str) -> Result<ServerCert, WorkloadError> {
        let what = "certificate/server";
        let expiration = crate::model::time::rfc3339(
            std::time::SystemTime::now() + Duration::from_secs(REQUESTED_CERT_DAYS * 24 * 60 * 60),
        );
        let body = json!({"commonName": common_name, "expiration": expiration});
        let answer = self
            .call(
                what,
                Method::POST,
                &self.module_path("certificate/server"),
                Some(body),
            )
            .await?;
        let chain_pem = string_field(what, &answer, "certificate")?.to_owned();
        let key_pem = answer
            .get("privateKey")
            .and_then(|k| k.get("bytes"))
            .and_then(Value::as_str)
            .ok_or_else(|| WorkloadError::Answer {
                what,
                why: "privateKey.bytes is missing".into(),
            })?
            .to_owned();
        let not_after = leaf_not_after(&chain_pem).ok_or_else(|| WorkloadError::Answer {
            what,
            why: "certificate holds no readable X.509 certificate".into(),
        })?;
        Ok(ServerCert {
            chain_pem,
            key_pem,
            not_after,
        })
    }

    /// The trust bundle: one or more PEM certificates.
    pub async fn trust_bundle(&self) -> Result<String, WorkloadError> {
        let what = "trust-bundle";
        let answer = self.call(what, Method::GET, "/trust-bundle", None).await?;
        Ok(string_field(what, &answer, "certificate")?.to_owned())
    }

    /// Encrypts with the runtime's key (bound to this module id and generation id).
    pub async fn encrypt(&self, plaintext: &[u8], iv: &[u8]) -> Result<Vec<u8>, WorkloadError> {
        let what = "encrypt";
        let body =
            json!({"plaintext": B64.encode(plaintext), "initializationVector": B64.encode(iv)});
        let answer = self
            .call(what, Method::POST, &self.module_path("encrypt"), Some(body))
            .await?;
        b64_field(what, &answer, "ciphertext")
    }

    pub async fn decrypt(&self, ciphertext: &[u8], iv: &[u8]) -> Result<Vec<u8>, WorkloadError> {
        let what = "decrypt";
        let body =
            json!({"ciphertext": B64.encode(ciphertext), "initializationVector": B64.encode(iv)});
        let answer = self
            .call(what, Method::POST, &self.module_path("decrypt"), Some(body))
            .await?;
        b64_field(what, &answer, "plaintext")
    }

    async fn call(
        &self,
        what: &'static str,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, WorkloadError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| WorkloadError::Transport {
                what,
                why: "client closed".into(),
            })?;
        let mut attempt = 0;
        loop {
            let once = tokio::time::timeout(
                REQUEST_TIMEOUT,
                self.once(what, method.clone(), path, body.as_ref()),
            )
            .await
            .unwrap_or_else(|_| {
                Err(WorkloadError::Transport {
                    what,
                    why: format!("no answer within {} s", REQUEST_TIMEOUT.as_secs()),
                })
            });
            match once {
                Err(e) if e.transient() && attempt < RETRIES => {
                    attempt += 1;
                    tracing::debug!(attempt, "{e}; retrying");
                    tokio::time::sleep(Duration::from_secs(u64::from(attempt))).await;
                }
                other => return other,
            }
        }
    }

    async fn once(
        &self,
        what: &'static str,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, WorkloadError> {
        let transport = |why: String| WorkloadError::Transport { what, why };
        let uri = format!("{path}?api-version={API_VERSION}");
        let mut request = Request::builder()
            .method(method)
            .uri(uri)
            .header(hyper::header::HOST, self.host.as_str());
        let payload = match body {
            Some(b) => {
                request = request.header(hyper::header::CONTENT_TYPE, "application/json");
                Bytes::from(b.to_string())
            }
            None => Bytes::new(),
        };
        let request = request
            .body(Full::new(payload))
            .map_err(|e| transport(e.to_string()))?;
        let response = match &self.endpoint {
            Endpoint::Unix(p) => {
                let s = tokio::net::UnixStream::connect(p)
                    .await
                    .map_err(|e| transport(format!("{}: {e}", p.display())))?;
                send(TokioIo::new(s), request).await
            }
            Endpoint::Tcp(a) => {
                let s = tokio::net::TcpStream::connect(a.as_str())
                    .await
                    .map_err(|e| transport(format!("{a}: {e}")))?;
                send(TokioIo::new(s), request).await
            }
        }
        .map_err(transport)?;
        let status = response.status();
        let bytes = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| transport(format!("reading the answer: {e}")))?
            .to_bytes();
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if !status.is_success() {
            let message = value
                .get("message")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).chars().take(200).collect());
            return Err(WorkloadError::Status {
                what,
                status,
                message,
            });
        }
        if !value.is_object() {
            return Err(WorkloadError::Answer {
                what,
                why: "not a JSON object".into(),
            });
        }
        Ok(value)
    }
}

async fn send<S>(
    io: TokioIo<S>,
    request: Request<Full<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())
}

fn string_field<'a>(what: &'static str, v: &'a Value, key: &str) -> Result<&'a str, WorkloadError> {
    v.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| WorkloadError::Answer {
            what,
            why: format!("{key} is missing"),
        })
}

fn b64_field(what: &'static str, v: &Value, key: &str) -> Result<Vec<u8>, WorkloadError> {
    B64.decode(string_field(what, v, key)?)
        .map_err(|_| WorkloadError::Answer {
            what,
            why: format!("{key} is not base64"),
        })
}

/// `notAfter` of the first certificate in a PEM text, Unix seconds.
pub fn leaf_not_after(pem: &str) -> Option<u64> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let der = CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()?
        .ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    u64::try_from(cert.validity().not_after.timestamp()).ok()
}

/// The `sr` of edgeHub's upstream AMQP tokens: the resource URL-encoded once
/// (`host%2Fdevices%2Fedge1%2Fmodules%2F%24edgeHub`).
pub fn client_sr(host: &str, device: &DeviceId, module: &ModuleId) -> String {
    let resource = format!("{host}/devices/{device}/modules/{module}");
    utf8_percent_encode(&resource, crate::model::sas::URI_COMPONENT).to_string()
}

/// The `sr` of edgeHub's HTTPS (device-scope) tokens: ids encoded twice, then the resource
/// once more (`host%2Fdevices%2Fedge1%2Fmodules%2F%252524edgeHub`).
pub fn service_sr(host: &str, device: &DeviceId, module: &ModuleId) -> String {
    let twice = |id: &str| {
        let once = utf8_percent_encode(id, crate::model::sas::URI_COMPONENT).to_string();
        utf8_percent_encode(&once, crate::model::sas::URI_COMPONENT).to_string()
    };
    let resource = format!(
        "{host}/devices/{}/modules/{}",
        twice(device.as_str()),
        twice(module.as_str())
    );
    utf8_percent_encode(&resource, crate::model::sas::URI_COMPONENT).to_string()
}

/// [`WorkloadClient`] as the sealer of the identities kept at rest.
impl crate::core::scope::Sealer for WorkloadClient {
    fn seal<'a>(&'a self, plaintext: &'a [u8], iv: &'a [u8]) -> crate::core::scope::SealFuture<'a> {
        Box::pin(async move { self.encrypt(plaintext, iv).await.map_err(|e| e.to_string()) })
    }

    fn open<'a>(
        &'a self,
        ciphertext: &'a [u8],
        iv: &'a [u8],
    ) -> crate::core::scope::SealFuture<'a> {
        Box::pin(async move {
            self.decrypt(ciphertext, iv)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

/// Shared by the TLS renewal, the upstream and the device-scope client.
pub type Workload = Arc<WorkloadClient>;

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> (DeviceId, ModuleId) {
        (
            DeviceId::parse("edge1").unwrap(),
            ModuleId::parse("$edgeHub").unwrap(),
        )
    }

    #[test]
    fn the_two_sr_encodings_are_edge_hubs() {
        let (d, m) = ids();
        assert_eq!(
            client_sr("contoso.azure-devices.net", &d, &m),
            "contoso.azure-devices.net%2Fdevices%2Fedge1%2Fmodules%2F%24edgeHub"
        );
        assert_eq!(
            service_sr("contoso.azure-devices.net", &d, &m),
            "contoso.azure-devices.net%2Fdevices%2Fedge1%2Fmodules%2F%252524edgeHub"
        );
    }

    #[test]
    fn uris_and_paths() {
        let m = ModuleId::parse("$edgeHub").unwrap();
        let c = WorkloadClient::new("unix:///var/run/iotedge/workload.sock", m.clone(), "6384")
            .unwrap();
        assert_eq!(c.host, "workload.sock");
        assert_eq!(c.module_path("sign"), "/modules/%24edgeHub/genid/6384/sign");
        assert!(WorkloadClient::new("http://127.0.0.1:8081", m.clone(), "1").is_ok());
        for bad in [
            "unix://relative.sock",
            "https://x",
            "/var/run/x.sock",
            "http://a/b",
        ] {
            assert!(
                matches!(
                    WorkloadClient::new(bad, m.clone(), "1"),
                    Err(WorkloadError::BadUri(_))
                ),
                "{bad}"
            );
        }
    }
}
