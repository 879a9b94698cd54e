//! The two HTTP listeners: plain-HTTP metrics (`GET /metrics` in the Prometheus text format)
//! and the HTTPS API (see `api`). Both are bounded: a connection cap each, a deadline on every
//! request head (idle keep-alive connections included), a size limit on heads, and accept
//! loops that back off when accepting fails; the API also bounds each request body's size and
//! the time it may take to arrive.

pub mod api;
pub mod registry;
pub mod scope;

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    body::Incoming, server::conn::http1, service::service_fn, Method, Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::{
    net::TcpListener,
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, warn};

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// Brings gauges up to date just before a scrape.
pub type Refresh = Arc<dyn Fn() + Send + Sync>;

async fn metrics_service(
    req: Request<Incoming>,
    handle: PrometheusHandle,
    refresh: Refresh,
) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            crate::metrics::process_gauges();
            refresh();
            respond(StatusCode::OK, "text/plain; version=0.0.4", handle.render())
        }
        (_, "/metrics") => respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".into(),
        ),
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /metrics\n".into(),
        ),
    })
}

/// Bounds of one HTTP listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Connections served at once; more are closed right after accept, so a client that opens
    /// many and sends nothing cannot take more than these.
    pub max_connections: usize,
    /// A request head (and an idle keep-alive connection's next one) must come within this.
    pub header_timeout: Duration,
}

/// Largest request head (request line and headers); larger is answered 431.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Largest read buffer per connection; bodies stream through it and have their own limits.
const MAX_BUF_BYTES: usize = 64 * 1024;
/// The first and the longest wait after a failed accept.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

fn http1(bounds: Bounds) -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(bounds.header_timeout)
        .max_header_size(MAX_HEAD_BYTES)
        .max_buf_size(MAX_BUF_BYTES);
    b
}

/// The next accepted connection, or `None` on shutdown. A failed accept (EMFILE when out of
/// descriptors, ENFILE, ENOBUFS…) fails again at once if tried at once: wait before the next
/// try, twice as long each time up to a second, so the loop does not spin.
pub(crate) async fn accept_with_backoff<T, F, Fut>(
    what: &str,
    shutdown: &CancellationToken,
    mut accept: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<T>>,
{
    let mut wait = ACCEPT_BACKOFF_MIN;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return None,
            a = accept() => a,
        };
        match accepted {
            Ok(a) => return Some(a),
            Err(e) => {
                warn!(listener = what, error = %e, retry_in_ms = wait.as_millis() as u64, "accept failed");
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(wait) => {}
                }
                wait = (wait * 2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }
}

/// A slot under the listener's connection cap, or `None` when all are taken.
fn slot(slots: &Arc<Semaphore>, what: &str, peer: SocketAddr) -> Option<OwnedSemaphorePermit> {
    let permit = slots.clone().try_acquire_owned().ok();
    if permit.is_none() {
        debug!(listener = what, %peer, "connection cap reached; connection closed");
    }
    permit
}

pub async fn serve_metrics(
    listener: TcpListener,
    handle: PrometheusHandle,
    shutdown: CancellationToken,
    refresh: Refresh,
    bounds: Bounds,
) {
    let tracker = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(bounds.max_connections));
    let builder = http1(bounds);
    while let Some((stream, peer)) =
        accept_with_backoff("metrics", &shutdown, || listener.accept()).await
    {
        let Some(permit) = slot(&slots, "metrics", peer) else {
            continue;
        };
        let handle = handle.clone();
        let shutdown = shutdown.clone();
        let refresh = refresh.clone();
        let builder = builder.clone();
        tracker.spawn(async move {
            let _permit = permit;
            let svc = service_fn(move |req| metrics_service(req, handle.clone(), refresh.clone()));
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r { debug!(error = %e, "metrics connection"); },
                _ = shutdown.cancelled() => conn.as_mut().graceful_shutdown(),
            }
        });
    }
    tracker.close();
    tracker.wait().await;
}

pub use crate::servers::ws::Upgrades;

/// The HTTPS API on `listen.https`: the direct-method API of modules and the service API
/// (direct methods and twins, see `api`), and AMQP and MQTT over WebSockets (see `ws`), whose
/// connections `upgrades` admits.
pub async fn serve_https(
    listener: TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    core: Arc<crate::core::HubCore>,
    shutdown: CancellationToken,
    upgrades: Upgrades,
) {
    let tracker = TaskTracker::new();
    let limits = &core.settings.limits;
    let bounds = Bounds {
        max_connections: limits.https_max_connections,
        header_timeout: Duration::from_secs(limits.http_header_timeout_secs),
    };
    let slots = Arc::new(Semaphore::new(bounds.max_connections));
    let builder = http1(bounds);
    while let Some((stream, peer)) =
        accept_with_backoff("https", &shutdown, || listener.accept()).await
    {
        let Some(permit) = slot(&slots, "https", peer) else {
            continue;
        };
        let (tls, core, shutdown) = (tls.clone(), core.clone(), shutdown.clone());
        let builder = builder.clone();
        let (to, upgrades) = (upgrades.clone(), tracker.clone());
        tracker.spawn(async move {
            let _permit = permit;
            let _ = stream.set_nodelay(true);
            let handshake = tokio::time::timeout(
                Duration::from_secs(core.settings.limits.handshake_timeout_secs),
                tls.accept(stream),
            );
            let stream = tokio::select! {
                _ = shutdown.cancelled() => return,
                s = handshake => match s {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => { debug!(%peer, error = %e, "https TLS handshake failed"); return; }
                    Err(_) => { debug!(%peer, "https TLS handshake timed out"); return; }
                },
            };
            // What the client's certificate proves, for a WebSocket on this connection.
            let presented = to.amqp.identify(stream.get_ref().1);
            let svc = service_fn(move |req| {
                let core = core.clone();
                // A WebSocket upgrade carries an AMQP or MQTT connection (`ws`); its task joins
                // this listener's, and the HTTPS slot is freed once the stream is handed over.
                let req = match crate::servers::ws::is_upgrade(&req) {
                    true => Err(crate::servers::ws::accept(req, &to, &upgrades, peer, presented.clone())),
                    false => Ok(req),
                };
                async move {
                    Ok::<_, Infallible>(match req {
                        Ok(req) => crate::servers::http::api::handle(req, &core).await,
                        Err(upgrade) => upgrade,
                    })
                }
            });
            let conn = builder
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r { debug!(error = %e, "https connection"); },
                _ = shutdown.cancelled() => conn.as_mut().graceful_shutdown(),
            }
        });
    }
    tracker.close();
    tracker.wait().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failing_accept_is_retried_with_backoff_not_in_a_spin() {
        let shutdown = CancellationToken::new();
        let tries = std::sync::atomic::AtomicUsize::new(0);
        let accepted = tokio::time::timeout(
            Duration::from_millis(1500),
            accept_with_backoff("test", &shutdown, || {
                tries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // EMFILE: out of file descriptors.
                std::future::ready(Err::<(), _>(std::io::Error::from_raw_os_error(24)))
            }),
        )
        .await;
        assert!(accepted.is_err(), "never accepted");
        // Waits of 10, 20, … 640 ms, then a second: about 8 tries in 1.5 s, not millions.
        let tries = tries.load(std::sync::atomic::Ordering::Relaxed);
        assert!((3..=12).contains(&tries), "{tries} tries");
        // Shutdown ends the wait at once.
        shutdown.cancel();
        let none = accept_with_backoff("test", &shutdown, || {
            std::future::pending::<std::io::Result<()>>()
        })
        .await;
        assert!(none.is_none());
    }
}
