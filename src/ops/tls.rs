//! Certificates and the TLS server configuration.
//!
//! When the config names no certificate, the first start creates an edge CA and a server
//! certificate for `gatewayHostname` (an IP SAN when it is an address, a DNS SAN otherwise)
//! under `dataDir/certs`, and later starts reuse them. If `gatewayHostname` changes, only the
//! server certificate is re-issued, by the same CA, so modules keep trusting the hub.

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
    sync::Arc,
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    ServerConfig,
};

use crate::config::Settings;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("generating certificates: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Pem {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{0}: no certificate found in the PEM file")]
    NoCert(PathBuf),
    #[error("{0}: no private key found in the PEM file")]
    NoKey(PathBuf),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_owned(),
        source,
    }
}

fn pem_err(path: &Path) -> impl FnOnce(rustls::pki_types::pem::Error) -> TlsError + '_ {
    move |source| TlsError::Pem {
        path: path.to_owned(),
        source,
    }
}

/// The files the hub serves TLS with.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

const CA_NAME: &str = "edgehub edge CA";

fn ca_params() -> Result<CertificateParams, rcgen::Error> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2049, 12, 31);
    Ok(p)
}

fn write_private(path: &Path, contents: &str) -> Result<(), TlsError> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(io_err(path))?;
    f.write_all(contents.as_bytes()).map_err(io_err(path))
}

/// Returns the certificate files, creating the hub's own when the config names none.
pub fn ensure_certs(settings: &Settings) -> Result<CertFiles, TlsError> {
    if let (Some(ca), Some(cert), Some(key)) = (
        &settings.tls.ca_cert,
        &settings.tls.server_cert,
        &settings.tls.server_key,
    ) {
        return Ok(CertFiles {
            ca_cert: absolute(ca),
            server_cert: absolute(cert),
            server_key: absolute(key),
        });
    }
    let dir = settings.data_dir.join("certs");
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let files = CertFiles {
        ca_cert: absolute(&dir.join("edge-ca.pem")),
        server_cert: absolute(&dir.join("server.pem")),
        server_key: absolute(&dir.join("server.key.pem")),
    };
    let ca_key_path = dir.join("edge-ca.key.pem");
    let host_path = dir.join("server.host");

    let ca_key = if files.ca_cert.exists() && ca_key_path.exists() {
        let pem = fs::read_to_string(&ca_key_path).map_err(io_err(&ca_key_path))?;
        KeyPair::from_pem(&pem)?
    } else {
        let key = KeyPair::generate()?;
        let cert = ca_params()?.self_signed(&key)?;
        write_private(&ca_key_path, &key.serialize_pem())?;
        fs::write(&files.ca_cert, cert.pem()).map_err(io_err(&files.ca_cert))?;
        // A new CA invalidates any server certificate from an older one.
        let _ = fs::remove_file(&files.server_cert);
        key
    };

    let host = &settings.gateway_hostname;
    let current_host = fs::read_to_string(&host_path).unwrap_or_default();
    if !files.server_cert.exists() || !files.server_key.exists() || current_host.trim() != host {
        // Re-create the issuer from the same name and key: the server certificate then chains
        // to the CA file already on disk.
        let issuer = ca_params()?.self_signed(&ca_key)?;
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(vec![host.clone()])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host.as_str());
        p.distinguished_name = dn;
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.not_before = rcgen::date_time_ymd(2024, 1, 1);
        p.not_after = rcgen::date_time_ymd(2049, 12, 31);
        let cert = p.signed_by(&key, &issuer, &ca_key)?;
        write_private(&files.server_key, &key.serialize_pem())?;
        fs::write(&files.server_cert, cert.pem()).map_err(io_err(&files.server_cert))?;
        fs::write(&host_path, host).map_err(io_err(&host_path))?;
    }
    Ok(files)
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_owned()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_owned())
    }
}

/// Builds the rustls server configuration: the server certificate followed by the CA.
pub fn server_config(files: &CertFiles) -> Result<Arc<ServerConfig>, TlsError> {
    server_config_with(files, None)
}

/// Like `server_config`; with `client_auth`, clients are asked for a certificate (see `x509`).
pub fn server_config_with(
    files: &CertFiles,
    client_auth: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let read = |p: &Path| fs::read(p).map_err(io_err(p));
    let mut chain = Vec::new();
    for path in [&files.server_cert, &files.ca_cert] {
        let pem = read(path)?;
        let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<_, _>>()
            .map_err(pem_err(path))?;
        if certs.is_empty() {
            return Err(TlsError::NoCert(path.clone()));
        }
        // A user-supplied server file may already hold the chain; don't repeat the CA.
        for c in certs {
            if !chain.contains(&c) {
                chain.push(c);
            }
        }
    }
    let key_pem = read(&files.server_key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey(files.server_key.clone()),
        e => pem_err(&files.server_key)(e),
    })?;
    let builder =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?;
    let builder = match client_auth {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let config = builder.with_single_cert(chain, key)?;
    Ok(Arc::new(config))
}

/// The server certificate of runtime mode: replaced while the listeners run (renewal before
/// expiry), so that new handshakes get the new certificate and open connections stay.
#[derive(Debug)]
pub struct SwappableCert(std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>);

impl SwappableCert {
    /// From the leaf-and-chain PEM and the private key PEM (PKCS#8, PKCS#1 or SEC1).
    pub fn from_pem(chain_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        Ok(Self(std::sync::RwLock::new(certified_key(
            chain_pem, key_pem,
        )?)))
    }

    /// Serves `chain_pem`/`key_pem` from the next handshake on.
    pub fn replace(&self, chain_pem: &str, key_pem: &str) -> Result<(), TlsError> {
        let next = certified_key(chain_pem, key_pem)?;
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = next;
        Ok(())
    }

    /// The leaf served now (DER).
    pub fn leaf(&self) -> Option<CertificateDer<'static>> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .cert
            .first()
            .cloned()
    }
}

impl rustls::server::ResolvesServerCert for SwappableCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

fn certified_key(
    chain_pem: &str,
    key_pem: &str,
) -> Result<Arc<rustls::sign::CertifiedKey>, TlsError> {
    let what = PathBuf::from("<workload API certificate>");
    let chain: Vec<_> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(pem_err(&what))?;
    if chain.is_empty() {
        return Err(TlsError::NoCert(what));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey(what.clone()),
        e => pem_err(&what)(e),
    })?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)?;
    Ok(Arc::new(rustls::sign::CertifiedKey::new(chain, signing)))
}

/// The rustls server configuration over a replaceable certificate.
pub fn server_config_swappable(
    cert: Arc<SwappableCert>,
    client_auth: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let builder =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?;
    let builder = match client_auth {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(builder.with_cert_resolver(cert)))
}

/// Why the CA certificates for the upstream connection could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RootsError {
    #[error("{}: {source}", path.display())]
    Pem {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{}: unusable CA certificate: {source}", path.display())]
    Unusable {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("{}: no CA certificate in the file", .0.display())]
    EmptyFile(PathBuf),
    /// With the first error the platform store reported, if any (`: …`).
    #[error("no CA certificate in the platform store{0} (install the ca-certificates package, or set upstream.caCert)")]
    NoPlatformRoots(String),
}

/// The CA certificates the upstream connection trusts: `upstream.caCert` when it is set (every
/// certificate in it must be usable), otherwise the platform's store as `rustls-native-certs`
/// finds it (`SSL_CERT_FILE`/`SSL_CERT_DIR`, else the distribution's bundle, such as the one
/// Debian's `ca-certificates` installs); a platform certificate rustls cannot use is skipped.
pub fn upstream_roots(
    up: &crate::config::UpstreamSettings,
) -> Result<rustls::RootCertStore, RootsError> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    if let Some(path) = &up.ca {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|source| RootsError::Pem {
                path: path.clone(),
                source,
            })?;
        for c in certs {
            roots.add(c).map_err(|source| RootsError::Unusable {
                path: path.clone(),
                source,
            })?;
        }
        if roots.is_empty() {
            return Err(RootsError::EmptyFile(path.clone()));
        }
        return Ok(roots);
    }
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if roots.is_empty() {
        let why = native
            .errors
            .first()
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        return Err(RootsError::NoPlatformRoots(why));
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("edgehub-tls-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Writes a CA and a server certificate for `localhost` signed by it.
    fn write_certs(dir: &Path) -> CertFiles {
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params().unwrap().self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        let files = CertFiles {
            ca_cert: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key.pem"),
        };
        fs::write(&files.ca_cert, ca.pem()).unwrap();
        fs::write(&files.server_cert, cert.pem()).unwrap();
        fs::write(&files.server_key, key.serialize_pem()).unwrap();
        files
    }

    #[test]
    fn server_config_reads_the_pem_files() {
        let dir = temp_dir("ok");
        let files = write_certs(&dir);
        server_config(&files).unwrap();
        // A server file that already carries the chain is accepted as well.
        let chain = fs::read_to_string(&files.server_cert).unwrap()
            + &fs::read_to_string(&files.ca_cert).unwrap();
        fs::write(&files.server_cert, chain).unwrap();
        server_config(&files).unwrap();
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn server_config_names_the_file_that_lacks_a_certificate_or_key() {
        let dir = temp_dir("missing");
        let files = write_certs(&dir);
        let cert = fs::read(&files.server_cert).unwrap();

        // A certificate where the key should be: no key in the file.
        fs::write(&files.server_key, &cert).unwrap();
        let err = server_config(&files).unwrap_err();
        assert!(
            matches!(&err, TlsError::NoKey(p) if *p == files.server_key),
            "{err}"
        );

        // A key where the CA should be: no certificate in the file.
        fs::write(&files.ca_cert, KeyPair::generate().unwrap().serialize_pem()).unwrap();
        let err = server_config(&files).unwrap_err();
        assert!(
            matches!(&err, TlsError::NoCert(p) if *p == files.ca_cert),
            "{err}"
        );

        // A PEM section whose base64 is broken is an error naming the file.
        fs::write(
            &files.ca_cert,
            "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let err = server_config(&files).unwrap_err();
        assert!(
            matches!(&err, TlsError::Pem { path, .. } if *path == files.ca_cert),
            "{err}"
        );
        fs::remove_dir_all(dir).unwrap();
    }
}
