//! Plain-HTTP metrics endpoint: `GET /metrics` in the Prometheus text format.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    body::Incoming, server::conn::http1, service::service_fn, Method, Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::debug;

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// Brings gauges up to date just before a scrape.
pub type Refresh = std::sync::Arc<dyn Fn() + Send + Sync>;

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

pub async fn serve_metrics(
    listener: TcpListener,
    handle: PrometheusHandle,
    shutdown: CancellationToken,
    refresh: Refresh,
) {
    let tracker = TaskTracker::new();
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => { debug!(error = %e, "metrics accept failed"); continue; }
            },
        };
        let handle = handle.clone();
        let shutdown = shutdown.clone();
        let refresh = refresh.clone();
        tracker.spawn(async move {
            let svc = service_fn(move |req| metrics_service(req, handle.clone(), refresh.clone()));
            let conn = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
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

/// The HTTPS API on `listen.https`: the direct-method API of modules and the service API
/// (direct methods and twins, see `api`).
pub async fn serve_https(
    listener: TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    core: std::sync::Arc<crate::hub::HubCore>,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => { debug!(error = %e, "https accept failed"); continue; }
            },
        };
        let (tls, core, shutdown) = (tls.clone(), core.clone(), shutdown.clone());
        tracker.spawn(async move {
            let _ = stream.set_nodelay(true);
            let handshake = tokio::time::timeout(
                std::time::Duration::from_secs(core.settings.limits.handshake_timeout_secs),
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
            let svc = service_fn(move |req| {
                let core = core.clone();
                async move { Ok::<_, Infallible>(crate::api::handle(req, &core).await) }
            });
            let conn = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(30))
                .serve_connection(TokioIo::new(stream), svc);
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
