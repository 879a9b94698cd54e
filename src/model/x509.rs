//! Certificate identities as configured: thumbprints and the CA rule of `devices.<id>.x509`.

use std::fmt;

/// A certificate thumbprint: the SHA-1 (20 bytes) or SHA-256 (32 bytes) of its DER.
#[derive(Clone, PartialEq, Eq)]
pub struct Thumbprint(Vec<u8>);

impl fmt::Debug for Thumbprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02X}")?;
        }
        Ok(())
    }
}

impl Thumbprint {
    /// 40 or 64 hex digits, either case (IoT Hub's own form is upper-case SHA-1).
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if !(s.len() == 40 || s.len() == 64) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "{s:?} is not a thumbprint: 40 (SHA-1) or 64 (SHA-256) hex digits"
            ));
        }
        let bytes = (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|e| e.to_string()))
            .collect::<Result<Vec<u8>, String>>()?;
        Ok(Self(bytes))
    }

    /// The thumbprint of a certificate, of the same kind (SHA-1 or SHA-256) as `self`.
    fn of_same_kind(&self, der: &[u8]) -> Vec<u8> {
        let alg = match self.0.len() {
            20 => &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
            _ => &ring::digest::SHA256,
        };
        ring::digest::digest(alg, der).as_ref().to_vec()
    }

    pub(crate) fn matches(&self, der: &[u8]) -> bool {
        // Both are public values (the certificate is sent in clear in TLS 1.2): no need for a
        // constant-time comparison.
        self.of_same_kind(der) == self.0
    }

    /// The SHA-1 thumbprint of a certificate, upper-case hex, as IoT Hub shows it.
    pub fn sha1_hex(der: &[u8]) -> String {
        format!(
            "{:?}",
            Thumbprint(
                ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, der)
                    .as_ref()
                    .to_vec()
            )
        )
    }
}

/// How a device authenticates with a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum X509Auth {
    /// A self-signed (or any) certificate whose thumbprint is one of these.
    Thumbprints(Vec<Thumbprint>),
    /// A certificate chaining to `tls.clientCaCerts` with the device id as its CN.
    Ca,
}
