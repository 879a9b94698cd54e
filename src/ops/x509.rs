//! X.509 client authentication for downstream devices, as IoT Hub and edgeHub do it: a device
//! declared with `x509` is authenticated by the certificate it presents in the TLS handshake,
//! without `$cbs` (and with SASL EXTERNAL for clients that use SASL).
//!
//! Two kinds, per device (`devices.<id>.x509`):
//! * **thumbprint** (self-signed): `primaryThumbprint` / `secondaryThumbprint`, hex of the
//!   certificate's SHA-1 (40 digits, what IoT Hub shows) or SHA-256 (64 digits; IoT Hub accepts
//!   both). The certificate's name does not matter.
//! * **CA** (`"ca": true`): a chain to one of the CAs in `tls.clientCaCerts`, verified by
//!   webpki (signatures, validity of every certificate, the client-auth usage when the
//!   certificate lists usages), whose subject CN is the device id.
//!
//! The TLS listeners ask for a certificate but do not require one, and accept any certificate
//! whose holder proves its key ([`AnyClientCert`]): a certificate that matches nothing (or is
//! expired, not yet valid, or names another device) gives the connection no identity, so its
//! links are refused with `amqp:unauthorized-access` as any unauthenticated link is; it may still
//! put a token on `$cbs`. [`Matcher::identify`] is pure (the time is an argument).

use std::{collections::HashMap, fmt, path::Path, sync::Arc};

use rustls::{
    client::danger::HandshakeSignatureValid,
    crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider},
    pki_types::{pem::PemObject, CertificateDer, UnixTime},
    server::{
        danger::{ClientCertVerified, ClientCertVerifier},
        WebPkiClientVerifier,
    },
    DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};

use crate::model::identity::{DeviceId, Identity, IdentityKey};

pub use crate::model::x509::{Thumbprint, X509Auth};

/// What the peer of a TLS connection presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Presented {
    /// A certificate that authenticates `id` until `not_after` (Unix seconds).
    Identity { id: Identity, not_after: u64 },
    /// A certificate that authenticates nobody, and why (for the log).
    Unmatched(String),
}

#[derive(Debug, thiserror::Error)]
pub enum X509Error {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: no CA certificate could be read from the PEM file")]
    NoCa(std::path::PathBuf),
    #[error("{path}: {why}")]
    BadCa {
        path: std::path::PathBuf,
        why: String,
    },
}

/// The devices that authenticate with certificates, and the client CAs.
pub struct Matcher {
    /// Device → the device as configured and its kind.
    devices: HashMap<IdentityKey, (DeviceId, X509Auth)>,
    /// Verifies CA-signed chains (`tls.clientCaCerts`); `None` without that file.
    cas: Option<Arc<dyn ClientCertVerifier>>,
}

impl fmt::Debug for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Matcher")
            .field("devices", &self.devices.len())
            .field("cas", &self.cas.is_some())
            .finish()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The CA certificates of a PEM file: every one must parse as a trust anchor.
pub fn read_cas(path: &Path) -> Result<RootCertStore, X509Error> {
    let pem = std::fs::read(path).map_err(|source| X509Error::Io {
        path: path.to_owned(),
        source,
    })?;
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&pem) {
        let c = c.map_err(|e| X509Error::BadCa {
            path: path.to_owned(),
            why: e.to_string(),
        })?;
        roots.add(c).map_err(|e| X509Error::BadCa {
            path: path.to_owned(),
            why: e.to_string(),
        })?;
    }
    if roots.is_empty() {
        return Err(X509Error::NoCa(path.to_owned()));
    }
    Ok(roots)
}

impl Matcher {
    /// From the devices' `x509` settings and the client CA file (read now).
    pub fn new<'a>(
        devices: impl IntoIterator<Item = (&'a DeviceId, &'a X509Auth)>,
        client_cas: Option<&Path>,
    ) -> Result<Self, X509Error> {
        let devices = devices
            .into_iter()
            .map(|(d, a)| (IdentityKey::from(d), (d.clone(), a.clone())))
            .collect();
        let cas = match client_cas {
            None => None,
            Some(path) => {
                let roots = read_cas(path)?;
                let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                    .build()
                    .map_err(|e| X509Error::BadCa {
                        path: path.to_owned(),
                        why: e.to_string(),
                    })?;
                Some(v)
            }
        };
        Ok(Self { devices, cas })
    }

    /// From the settings: every `devices.<id>.x509`, and `tls.clientCaCerts`.
    pub fn from_settings(settings: &crate::config::Settings) -> Result<Self, X509Error> {
        Self::new(
            settings
                .devices
                .iter()
                .filter_map(|(d, s)| s.x509.as_ref().map(|a| (d, a))),
            settings.tls.client_ca_certs.as_deref(),
        )
    }

    /// Does any device authenticate with a certificate? Only then do the listeners ask for one.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// The identity a certificate chain (end entity first) proves at `now`, if any.
    pub fn identify(&self, chain: &[CertificateDer<'_>], now: UnixTime) -> Presented {
        self.identify_with(chain, now, &[])
    }

    /// [`identify`](Self::identify), with `extra` devices (the identity registry's) after those
    /// of the config.
    pub fn identify_with(
        &self,
        chain: &[CertificateDer<'_>],
        now: UnixTime,
        extra: &[(DeviceId, X509Auth)],
    ) -> Presented {
        let Some(end) = chain.first() else {
            return Presented::Unmatched("no certificate".into());
        };
        let cert = match x509_parser::parse_x509_certificate(end) {
            Ok((_, c)) => c,
            Err(e) => return Presented::Unmatched(format!("unreadable certificate: {e}")),
        };
        let secs = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        let validity = cert.validity();
        if validity.not_after.timestamp() < secs {
            return Presented::Unmatched(format!("certificate expired at {}", validity.not_after));
        }
        if validity.not_before.timestamp() > secs {
            return Presented::Unmatched(format!(
                "certificate not valid before {}",
                validity.not_before
            ));
        }
        let not_after = u64::try_from(validity.not_after.timestamp()).unwrap_or(0);
        let every = self
            .devices
            .values()
            .map(|(d, a)| (d, a))
            .chain(extra.iter().map(|(d, a)| (d, a)));
        for (device, auth) in every {
            if let X509Auth::Thumbprints(t) = auth {
                if t.iter().any(|t| t.matches(end)) {
                    return Presented::Identity {
                        id: Identity::Device(device.clone()),
                        not_after,
                    };
                }
            }
        }
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .unwrap_or_default();
        let by_cn = DeviceId::parse(cn)
            .ok()
            .and_then(|d| self.devices.get(&IdentityKey::from(&d)))
            .map(|(d, a)| (d, a))
            .or_else(|| {
                extra
                    .iter()
                    .find(|(d, _)| d.as_str().eq_ignore_ascii_case(cn))
                    .map(|(d, a)| (d, a))
            });
        let Some((device, auth)) = by_cn else {
            return Presented::Unmatched(format!(
                "thumbprint {} matches no device, and CN {:?} names no device with x509",
                Thumbprint::sha1_hex(end),
                crate::model::clip(cn)
            ));
        };
        if *auth != X509Auth::Ca {
            return Presented::Unmatched(format!(
                "CN {device} authenticates by thumbprint, and this certificate's thumbprint {} is not one of its",
                Thumbprint::sha1_hex(end)
            ));
        }
        let Some(cas) = &self.cas else {
            return Presented::Unmatched(
                "no tls.clientCaCerts to verify a CA-signed certificate".into(),
            );
        };
        match cas.verify_client_cert(end, &chain[1..], now) {
            Ok(_) => Presented::Identity {
                id: Identity::Device(device.clone()),
                not_after,
            },
            Err(e) => Presented::Unmatched(format!("CN {device}: the chain does not verify: {e}")),
        }
    }
}

/// The TLS listeners' client-certificate policy: ask for one, require none, take any whose
/// holder signs the handshake with its key. What it proves is decided after the handshake by
/// [`Matcher::identify`], so that a certificate that matches nothing costs the connection its
/// identity, not its TLS session (the client then learns why from the AMQP refusal).
#[derive(Debug)]
pub struct AnyClientCert {
    provider: Arc<CryptoProvider>,
}

impl AnyClientCert {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            provider: provider(),
        })
    }
}

impl ClientCertVerifier for AnyClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: a client with a self-signed certificate must send it all the same.
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// What the peer of a server TLS connection presented, for `matcher`: `None` without a
/// certificate.
pub fn presented(
    matcher: &Matcher,
    tls: &rustls::ServerConnection,
    extra: impl FnOnce() -> Vec<(DeviceId, X509Auth)>,
) -> Option<Presented> {
    let chain = tls.peer_certificates()?;
    Some(matcher.identify_with(chain, UnixTime::now(), &extra()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    };

    fn params(cn: &str, from: (i32, u8, u8), to: (i32, u8, u8)) -> CertificateParams {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.not_before = rcgen::date_time_ymd(from.0, from.1, from.2);
        p.not_after = rcgen::date_time_ymd(to.0, to.1, to.2);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p
    }

    const NOW: u64 = 1_800_000_000; // 2027-01-15
    const VALID: ((i32, u8, u8), (i32, u8, u8)) = ((2024, 1, 1), (2040, 1, 1));

    fn now() -> UnixTime {
        UnixTime::since_unix_epoch(std::time::Duration::from_secs(NOW))
    }

    fn device(s: &str) -> DeviceId {
        DeviceId::parse(s).unwrap()
    }

    #[test]
    fn thumbprints_parse_in_either_form_and_length() {
        let sha1 = "a".repeat(40);
        assert!(Thumbprint::parse(&sha1).is_ok());
        assert!(Thumbprint::parse(&"0F".repeat(32)).is_ok());
        for bad in ["", "abc", &"g".repeat(40), &"a".repeat(41), "AB:CD"] {
            assert!(Thumbprint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn certificates_are_matched_by_thumbprint_or_by_ca_and_cn() {
        let dir = std::env::temp_dir().join(format!("edgehub-x509-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        // A CA and devices it signs.
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_p = params("client CA", VALID.0, VALID.1);
        ca_p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_p.extended_key_usages.clear();
        let ca = ca_p.self_signed(&ca_key).unwrap();
        let ca_path = dir.join("ca.pem");
        std::fs::write(&ca_path, ca.pem()).unwrap();
        let signed = |cn: &str, from, to| {
            let k = KeyPair::generate().unwrap();
            params(cn, from, to)
                .signed_by(&k, &ca, &ca_key)
                .unwrap()
                .der()
                .clone()
        };
        let self_signed = |cn: &str, from, to| {
            let k = KeyPair::generate().unwrap();
            params(cn, from, to).self_signed(&k).unwrap().der().clone()
        };
        let thumb = self_signed("whatever", VALID.0, VALID.1);
        let thumb_sha256 = self_signed("other", VALID.0, VALID.1);
        let sha256_hex: String = ring::digest::digest(&ring::digest::SHA256, &thumb_sha256)
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let devices = [
            (
                device("selfie"),
                X509Auth::Thumbprints(vec![
                    Thumbprint::parse(&"0".repeat(40)).unwrap(),
                    Thumbprint::parse(&Thumbprint::sha1_hex(&thumb).to_lowercase()).unwrap(),
                ]),
            ),
            (
                device("selfie256"),
                X509Auth::Thumbprints(vec![Thumbprint::parse(&sha256_hex).unwrap()]),
            ),
            (device("Signed"), X509Auth::Ca),
            (device("signed2"), X509Auth::Ca),
        ];
        let m = Matcher::new(devices.iter().map(|(d, a)| (d, a)), Some(&ca_path)).unwrap();
        let who = |chain: &[CertificateDer<'static>]| match m.identify(chain, now()) {
            Presented::Identity { id, .. } => Ok(id.to_string()),
            Presented::Unmatched(why) => Err(why),
        };
        assert_eq!(who(std::slice::from_ref(&thumb)).as_deref(), Ok("selfie"));
        assert_eq!(who(&[thumb_sha256]).as_deref(), Ok("selfie256"));
        assert_eq!(
            who(&[signed("signed", VALID.0, VALID.1)]).as_deref(),
            Ok("Signed")
        );
        assert_eq!(
            who(&[signed("signed2", VALID.0, VALID.1)]).as_deref(),
            Ok("signed2")
        );
        // Refusals: expired, not yet valid, a CN of no device or of a thumbprint device,
        // a self-signed certificate claiming a CA device's name, an unknown thumbprint.
        let refused = [
            (signed("signed", (2020, 1, 1), (2021, 1, 1)), "expired"),
            (
                signed("signed", (2030, 1, 1), (2040, 1, 1)),
                "not valid before",
            ),
            (signed("nobody", VALID.0, VALID.1), "names no device"),
            (signed("selfie", VALID.0, VALID.1), "by thumbprint"),
            (self_signed("signed", VALID.0, VALID.1), "does not verify"),
            (self_signed("x", VALID.0, VALID.1), "matches no device"),
            (self_signed("selfie", (2020, 1, 1), (2021, 1, 1)), "expired"),
        ];
        for (cert, why) in refused {
            let got = who(&[cert]);
            assert!(
                got.as_ref().is_err_and(|e| e.contains(why)),
                "{why}: {got:?}"
            );
        }
        // The grant lasts as long as the certificate.
        match m.identify(std::slice::from_ref(&thumb), now()) {
            Presented::Identity { not_after, .. } => assert_eq!(not_after, 2_208_988_800),
            other => panic!("{other:?}"),
        }
        // Without the CA file, CA devices cannot be verified.
        let no_cas = Matcher::new(devices.iter().map(|(d, a)| (d, a)), None).unwrap();
        assert!(matches!(
            no_cas.identify(&[signed("signed", VALID.0, VALID.1)], now()),
            Presented::Unmatched(_)
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
