//! The `upstream` section: the parent this hub connects to, and the HTTP proxy on the way.

use std::{fmt, path::PathBuf};

use serde_json::Value;

use super::walk::{hostname_ok, Walk};
use crate::model::identity::Key;

/// Where and how this hub connects upstream.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    pub hostname: String,
    pub port: u16,
    /// The parent's HTTPS port, for the device-scope API in runtime mode (443).
    pub scope_port: u16,
    /// PEM bundle of the CAs to trust; `None` = the system's roots.
    pub ca: Option<PathBuf>,
    /// The key of this hub's `$edgeHub` identity; `None` = derived from `deviceKey`.
    pub edge_hub_key: Option<Key>,
    /// Reconnect backoff bounds, in milliseconds.
    pub min_backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// Most unacknowledged telemetry transfers in flight upstream.
    pub window: usize,
    /// Lifetime of the tokens put upstream, in seconds; they are renewed on the live
    /// connection at three quarters of it.
    pub token_lifetime_secs: u64,
    /// AMQP over TLS (port 5671), or AMQP over WebSockets (port 443).
    pub protocol: UpstreamProtocol,
    /// The HTTP proxy the WebSocket connection goes through (`upstream.proxy`, else
    /// `https_proxy` as edgeHub reads it); only with `amqpws`.
    pub proxy: Option<Proxy>,
}

/// How the hub reaches its parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    Amqp,
    AmqpWs,
}

/// An HTTP proxy reached with `CONNECT`.
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    pub host: String,
    pub port: u16,
    /// `user:password` for basic authentication, from the URL.
    pub basic_auth: Option<String>,
}

impl fmt::Debug for Proxy {
    // The password stays out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}:{}", self.host, self.port)?;
        if self.basic_auth.is_some() {
            write!(f, " (with basic authentication)")?;
        }
        Ok(())
    }
}

impl Proxy {
    /// `http://[user[:password]@]host[:port]` (port default 80; a bare `host:port` is taken
    /// as http too, as curl does).
    pub fn parse(text: &str) -> Result<Self, String> {
        let with_scheme = if text.contains("://") {
            text.to_owned()
        } else {
            format!("http://{text}")
        };
        let url = url::Url::parse(&with_scheme).map_err(|e| format!("not a URL: {e}"))?;
        if url.scheme() != "http" {
            return Err(format!(
                "the proxy is reached with http, not {}",
                url.scheme()
            ));
        }
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or("has no host")?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        let basic_auth = (!url.username().is_empty()).then(|| {
            format!(
                "{}:{}",
                decode(url.username()),
                decode(url.password().unwrap_or_default())
            )
        });
        Ok(Self {
            host,
            port: url.port().unwrap_or(80),
            basic_auth,
        })
    }
}

/// `upstream`: `{hostname, port?, caCert?, sharedAccessKey? | connectionString?, …}`.
pub(super) fn upstream_settings(w: &mut Walk, u: &Value) -> Option<UpstreamSettings> {
    let p = "$.upstream";
    let u = w.object(
        u,
        p,
        &[
            "hostname",
            "port",
            "caCert",
            "sharedAccessKey",
            "connectionString",
            "minBackoffMs",
            "maxBackoffMs",
            "window",
            "tokenLifetimeSecs",
            "protocol",
            "proxy",
            "httpsPort",
        ],
    )?;
    let hostname = w.string(u, p, "hostname", true).and_then(|h| {
        if hostname_ok(h) {
            Some(h.to_owned())
        } else {
            w.err(
                "$.upstream.hostname",
                format!("{h:?} is not a valid host name"),
            );
            None
        }
    });
    let protocol = match w.string(u, p, "protocol", false) {
        None | Some("amqp") => UpstreamProtocol::Amqp,
        Some("amqpws") => UpstreamProtocol::AmqpWs,
        Some(other) => {
            w.err(
                "$.upstream.protocol",
                format!("{other:?}: must be \"amqp\" or \"amqpws\""),
            );
            UpstreamProtocol::Amqp
        }
    };
    let default_port = match protocol {
        UpstreamProtocol::Amqp => 5671,
        UpstreamProtocol::AmqpWs => 443,
    };
    let port = w.uint(u, p, "port", 65_535).unwrap_or(default_port) as u16;
    let scope_port = w.uint(u, p, "httpsPort", 65_535).unwrap_or(443) as u16;
    let configured_proxy = w.string(u, p, "proxy", false);
    if configured_proxy.is_some() && protocol == UpstreamProtocol::Amqp {
        w.err(
            "$.upstream.proxy",
            "a proxy carries only \"amqpws\": set upstream.protocol to \"amqpws\"",
        );
    }
    let proxy = configured_proxy.and_then(|text| match Proxy::parse(text) {
        Ok(proxy) => Some(proxy),
        Err(e) => {
            w.err("$.upstream.proxy", e);
            None
        }
    });
    let ca = w.string(u, p, "caCert", false).map(PathBuf::from);
    let mut edge_hub_key = w.key(u, p, "sharedAccessKey");
    if let Some(cs) = w.string(u, p, "connectionString", false) {
        match crate::model::identity::ConnectionString::parse(cs) {
            Ok(c) if c.module_id.as_deref() == Some("$edgeHub") => {
                if edge_hub_key.is_some() {
                    w.err(p, "give sharedAccessKey or connectionString, not both");
                }
                match c.shared_access_key.as_deref().map(Key::from_base64) {
                    Some(Ok(k)) => edge_hub_key = Some(k),
                    Some(Err(e)) => w.err("$.upstream.connectionString", e),
                    None => w.err("$.upstream.connectionString", "has no SharedAccessKey"),
                }
            }
            Ok(_) => w.err(
                "$.upstream.connectionString",
                "must be the connection string of this device's $edgeHub module",
            ),
            Err(e) => w.err("$.upstream.connectionString", e),
        }
    }
    let min_backoff_ms = w.uint(u, p, "minBackoffMs", 60_000).unwrap_or(100).max(1);
    let max_backoff_ms = w.uint(u, p, "maxBackoffMs", 600_000).unwrap_or(10_000);
    if max_backoff_ms < min_backoff_ms {
        w.err("$.upstream.maxBackoffMs", "must be at least minBackoffMs");
    }
    let window = w.uint(u, p, "window", 65_535).unwrap_or(1000).max(1) as usize;
    let token_lifetime_secs = w.uint(u, p, "tokenLifetimeSecs", 86_400).unwrap_or(3600);
    if token_lifetime_secs < 4 {
        w.err("$.upstream.tokenLifetimeSecs", "must be at least 4");
    }
    Some(UpstreamSettings {
        hostname: hostname?,
        port,
        scope_port,
        ca,
        edge_hub_key,
        min_backoff_ms,
        max_backoff_ms,
        window,
        token_lifetime_secs,
        protocol,
        proxy,
    })
}
