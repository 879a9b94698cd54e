//! An HTTP proxy's tunnel (`CONNECT`), for the upstream over WebSockets and for
//! `edgehub check`.

use base64::Engine;
use http_body_util::Empty;
use hyper::{body::Bytes, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::config::Proxy;

/// Why no tunnel was made.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("the proxy {proxy:?}: {why}")]
    Failed { proxy: Proxy, why: String },
    #[error("the proxy {proxy:?} refused CONNECT to {target}: HTTP {status}")]
    Refused {
        proxy: Proxy,
        target: String,
        status: StatusCode,
    },
}

/// A TCP stream to `host:port` through `proxy` (`CONNECT`, basic authentication from the URL).
pub async fn tunnel(
    proxy: &Proxy,
    host: &str,
    port: u16,
) -> Result<TokioIo<hyper::upgrade::Upgraded>, ProxyError> {
    let target = format!("{host}:{port}");
    let failed = |why: String| ProxyError::Failed {
        proxy: proxy.clone(),
        why,
    };
    let tcp = TcpStream::connect((proxy.host.as_str(), proxy.port))
        .await
        .map_err(|e| failed(format!("connecting: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| failed(e.to_string()))?;
    // The connection task ends when the tunnel is handed over (or fails with the request).
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(target.as_str())
        .header(hyper::header::HOST, target.as_str());
    if let Some(auth) = &proxy.basic_auth {
        let encoded = base64::engine::general_purpose::STANDARD.encode(auth);
        request = request.header(
            hyper::header::PROXY_AUTHORIZATION,
            format!("Basic {encoded}"),
        );
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .map_err(|e| failed(e.to_string()))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| failed(e.to_string()))?;
    if response.status() != StatusCode::OK {
        return Err(ProxyError::Refused {
            proxy: proxy.clone(),
            target,
            status: response.status(),
        });
    }
    let upgraded = hyper::upgrade::on(response)
        .await
        .map_err(|e| failed(format!("taking over the tunnel: {e}")))?;
    Ok(TokioIo::new(upgraded))
}
