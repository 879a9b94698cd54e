//! Runtime mode's start-up and upkeep, in edgeHub's order: the server certificate for
//! `EdgeDeviceHostName` and the trust bundle from the workload API, the encryption IV of the
//! identities kept at rest (`dataDir/EdgeHubIV`), the device-scope cache (loaded from the store
//! before any network call) with its source, the parent's device-scope API; then, while the
//! hub runs, the certificate's renewal before it expires.
//!
//! Renewal replaces the certificate in the TLS configuration ([`SwappableCert`]): new
//! handshakes get the new one, open connections stay. It happens when a fifth of the
//! certificate's lifetime is left, at most 5 minutes before `notAfter` (edgeHub restarts
//! itself 2.5 minutes before it instead); a failed renewal is retried every 30 s.

use std::{path::PathBuf, sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    config::{RuntimeSettings, Settings},
    core::scope::{RefreshSettings, ScopeCache},
    ops::{
        device_scope::DeviceScopeClient,
        tls::SwappableCert,
        workload::{Workload, WorkloadClient, WorkloadError},
    },
};

/// Why runtime mode could not start.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{0}")]
    Workload(#[from] WorkloadError),
    #[error("the workload API's server certificate: {0}")]
    Tls(#[from] crate::ops::tls::TlsError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Scope(#[from] crate::core::scope::ScopeError),
    #[error("the device-scope client: {0}")]
    DeviceScope(String),
}

/// What runtime mode gets from the workload API at start.
pub struct Runtime {
    pub workload: Workload,
    pub cert: Arc<SwappableCert>,
    /// `notAfter` of the certificate served now, Unix seconds.
    pub not_after: u64,
    /// PEM; trusted for the upstream connection and the device-scope calls.
    pub trust_bundle: String,
    /// The trust bundle written out for the upstream connection (`upstream.caCert` unless set).
    pub trust_bundle_path: PathBuf,
    /// The IV of every value kept encrypted.
    pub iv: Vec<u8>,
}

/// Server certificate, trust bundle and IV.
pub async fn prepare(settings: &Settings, rt: &RuntimeSettings) -> Result<Runtime, RuntimeError> {
    let workload = Arc::new(WorkloadClient::new(
        &rt.workload_uri,
        rt.module_id.clone(),
        &rt.generation_id,
    )?);
    info!(
        uri = %rt.workload_uri,
        module = %rt.module_id,
        runtime_api_version = rt.api_version.as_deref().unwrap_or("unset"),
        api_version = crate::ops::workload::API_VERSION,
        "runtime mode: the workload API signs and issues certificates"
    );
    let server = workload.server_cert(&settings.gateway_hostname).await?;
    let cert = Arc::new(SwappableCert::from_pem(&server.chain_pem, &server.key_pem)?);
    let trust_bundle = workload.trust_bundle().await?;
    let dir = settings.data_dir.join("certs");
    let io = |path: &PathBuf| {
        let path = path.clone();
        move |source| RuntimeError::Io { path, source }
    };
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let trust_bundle_path = dir.join("trust-bundle.pem");
    std::fs::write(&trust_bundle_path, &trust_bundle).map_err(io(&trust_bundle_path))?;
    let iv = encryption_iv(&settings.data_dir)?;
    info!(
        common_name = %settings.gateway_hostname,
        not_after = server.not_after,
        "server certificate from the workload API"
    );
    Ok(Runtime {
        workload,
        cert,
        not_after: server.not_after,
        trust_bundle,
        trust_bundle_path,
        iv,
    })
}

/// `dataDir/EdgeHubIV`: 32 hex characters made once, sent as their UTF-8 bytes (edgeHub's
/// form). Losing it makes the kept identities unreadable, which the cache survives.
fn encryption_iv(data_dir: &std::path::Path) -> Result<Vec<u8>, RuntimeError> {
    let path = data_dir.join("EdgeHubIV");
    let io = |source| RuntimeError::Io {
        path: path.clone(),
        source,
    };
    if let Ok(text) = std::fs::read_to_string(&path) {
        let text = text.trim();
        if text.len() == 32 && text.chars().all(|c| c.is_ascii_hexdigit()) {
            return Ok(text.as_bytes().to_vec());
        }
        warn!(path = %path.display(), "the encryption IV is malformed; a new one is made");
    }
    std::fs::create_dir_all(data_dir).map_err(io)?;
    let iv = uuid::Uuid::new_v4().simple().to_string();
    std::fs::write(&path, &iv).map_err(io)?;
    Ok(iv.into_bytes())
}

/// The refresh policy: edgeHub's defaults, with the rate and delay of the environment
/// (`DeviceScopeCacheRefreshRateSecs`, `DeviceScopeCacheRefreshDelaySecs`).
fn refresh_settings(settings: &Settings) -> RefreshSettings {
    let mut r = RefreshSettings::default();
    if let Some(rt) = &settings.runtime {
        r.rate = std::time::Duration::from_secs(rt.scope_refresh_rate_secs);
        r.delay = std::time::Duration::from_secs(rt.scope_refresh_delay_secs);
    }
    r
}

/// The device-scope cache, loaded from `ks`, with the parent's device-scope API as its source.
pub async fn open_scope(
    settings: &Settings,
    runtime: &Runtime,
    ks: fjall::Keyspace,
) -> Result<Arc<ScopeCache>, RuntimeError> {
    let cache = ScopeCache::open(
        settings.device_id.clone(),
        refresh_settings(settings),
        ks,
        runtime.workload.clone(),
        runtime.iv.clone(),
    )
    .await?;
    if let Some(up) = &settings.upstream {
        let client = DeviceScopeClient::new(
            &up.hostname,
            up.scope_port,
            settings.device_id.clone(),
            &settings.iothub_hostname,
            runtime.workload.clone(),
            &runtime.trust_bundle,
        )
        .map_err(RuntimeError::DeviceScope)?
        .with_proxy(up.proxy.clone());
        cache.set_source(Arc::new(client));
    }
    Ok(Arc::new(cache))
}

/// When to renew a certificate fetched at `now` that expires at `not_after` (Unix seconds):
/// when a fifth of its lifetime is left, and no later than 5 minutes before it expires.
pub fn renew_at(now: u64, not_after: u64) -> u64 {
    let lifetime = not_after.saturating_sub(now);
    let margin = (lifetime / 5).min(300);
    not_after.saturating_sub(margin).max(now)
}

/// Renews the server certificate before it expires, until `shutdown`.
pub async fn renew_certificate(
    workload: Workload,
    cert: Arc<SwappableCert>,
    common_name: String,
    mut not_after: u64,
    shutdown: CancellationToken,
) {
    let mut fetched_at = crate::model::sas::now_secs();
    loop {
        let at = renew_at(fetched_at, not_after);
        let wait = Duration::from_secs(at.saturating_sub(crate::model::sas::now_secs()));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        // Until it works; the current certificate is served meanwhile.
        loop {
            let failed = match workload.server_cert(&common_name).await {
                Ok(next) => match cert.replace(&next.chain_pem, &next.key_pem) {
                    Ok(()) => {
                        info!(not_after = next.not_after, "server certificate renewed");
                        not_after = next.not_after;
                        fetched_at = crate::model::sas::now_secs();
                        break;
                    }
                    Err(e) => format!("the renewed server certificate is unusable: {e}"),
                },
                Err(e) => e.to_string(),
            };
            warn!("server certificate not renewed: {failed}; retrying in 30 s");
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(30)) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_comes_at_a_fifth_of_the_lifetime_at_most_five_minutes_early() {
        assert_eq!(renew_at(0, 30 * 86_400), 30 * 86_400 - 300);
        assert_eq!(renew_at(1000, 1100), 1080);
        assert_eq!(renew_at(1000, 900), 1000, "expired: at once");
    }

    #[test]
    fn the_iv_is_made_once() {
        let dir = std::env::temp_dir().join(format!("edgehub-iv-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = encryption_iv(&dir).unwrap();
        assert_eq!(a.len(), 32);
        assert_eq!(encryption_iv(&dir).unwrap(), a);
        std::fs::write(dir.join("EdgeHubIV"), "short").unwrap();
        assert_ne!(encryption_iv(&dir).unwrap(), a);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
