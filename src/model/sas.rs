//! Shared access signature tokens, verified as IoT Hub verifies them.
//!
//! A token is `SharedAccessSignature sr=<urlenc resource>&sig=<urlenc base64 hmac>&se=<unix
//! seconds>[&skn=<key name>]`, fields in any order. The signature is HMAC-SHA256 over the `sr`
//! value exactly as it appears in the token (still URL-encoded), a newline and the `se` text.
//! The identity is taken from the resource, never from anything else the client says.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use ring::hmac;

use crate::model::identity::{DeviceId, Identity, Key, KeyPair, ModuleId};

/// How far past `se` a token is still honoured, for clocks that disagree.
pub const MAX_CLOCK_SKEW_SECS: u64 = 300;

/// What `encodeURIComponent` leaves alone; everything else is percent-encoded.
pub(crate) const URI_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Why a token was refused. Each maps to a CBS status 401 (or 400 for `Malformed`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SasError {
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("token resource {0:?} names no device or module")]
    BadResource(String),
    #[error("token audience host {0:?} is neither the IoT hub nor this gateway")]
    WrongHost(String),
    #[error("token expired at {0} (unix seconds)")]
    Expired(u64),
    #[error("unknown identity {0}")]
    UnknownIdentity(String),
    #[error("token signature does not match the keys of {0}")]
    BadSignature(String),
    #[error("a token of {0} cannot be put on behalf of {1}")]
    NotOnBehalf(String, String),
    #[error("identity {0} is disabled")]
    Disabled(String),
}

/// A token split into its fields; `sr_raw` and `se_raw` are kept verbatim for the HMAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SasToken {
    pub sr_raw: String,
    pub se_raw: String,
    pub sig: Vec<u8>,
    pub skn: Option<String>,
    pub expiry: u64,
}

impl SasToken {
    pub fn parse(token: &str) -> Result<Self, SasError> {
        let rest = token
            .trim()
            .strip_prefix("SharedAccessSignature ")
            .ok_or_else(|| {
                SasError::Malformed("must start with 'SharedAccessSignature '".into())
            })?;
        let (mut sr, mut sig, mut se, mut skn) = (None, None, None, None);
        for field in rest.split('&') {
            let (k, v) = field
                .split_once('=')
                .ok_or_else(|| SasError::Malformed(format!("field {field:?} has no '='")))?;
            let slot = match k.trim() {
                "sr" => &mut sr,
                "sig" => &mut sig,
                "se" => &mut se,
                "skn" => &mut skn,
                other => return Err(SasError::Malformed(format!("unknown field {other:?}"))),
            };
            if slot.replace(v.to_owned()).is_some() {
                return Err(SasError::Malformed(format!("field {k:?} appears twice")));
            }
        }
        let sr_raw = sr.ok_or_else(|| SasError::Malformed("sr is missing".into()))?;
        let sig_raw = sig.ok_or_else(|| SasError::Malformed("sig is missing".into()))?;
        let se_raw = se.ok_or_else(|| SasError::Malformed("se is missing".into()))?;
        let expiry = se_raw
            .parse::<u64>()
            .map_err(|_| SasError::Malformed(format!("se {se_raw:?} is not an integer")))?;
        let sig_text = url_decode(&sig_raw)?;
        let sig = B64
            .decode(sig_text.as_bytes())
            .map_err(|_| SasError::Malformed("sig is not base64".into()))?;
        let skn = skn.map(|s| url_decode(&s)).transpose()?;
        Ok(Self {
            sr_raw,
            se_raw,
            sig,
            skn,
            expiry,
        })
    }

    /// The resource, URL-decoded once.
    pub fn resource(&self) -> Result<String, SasError> {
        url_decode(&self.sr_raw)
    }

    /// Parses the resource into `(host, identity)`.
    pub fn audience(&self) -> Result<(String, Identity), SasError> {
        parse_resource(&self.resource()?)
    }

    /// Checks the signature against both keys, in constant time per key.
    pub fn signed_by(&self, keys: &KeyPair) -> bool {
        let msg = format!("{}\n{}", self.sr_raw, self.se_raw);
        [&keys.primary, &keys.secondary].iter().any(|k| {
            let key = hmac::Key::new(hmac::HMAC_SHA256, k.as_bytes());
            hmac::verify(&key, msg.as_bytes(), &self.sig).is_ok()
        })
    }

    /// Checks the signature as Event Hubs signs: the HMAC key is the UTF-8 text of the key
    /// (its base64 form), not the decoded bytes.
    pub fn signed_with_key_text(&self, keys: &KeyPair) -> bool {
        let msg = format!("{}\n{}", self.sr_raw, self.se_raw);
        [&keys.primary, &keys.secondary].iter().any(|k| {
            let key = hmac::Key::new(hmac::HMAC_SHA256, k.to_base64().as_bytes());
            hmac::verify(&key, msg.as_bytes(), &self.sig).is_ok()
        })
    }

    pub fn expired_at(&self, now_secs: u64) -> bool {
        self.expiry.saturating_add(MAX_CLOCK_SKEW_SECS) < now_secs
    }
}

pub(crate) fn url_decode(s: &str) -> Result<String, SasError> {
    // `+` is how .NET encodes a space.
    let s = s.replace('+', " ");
    percent_decode_str(&s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| SasError::Malformed("percent-encoding is not UTF-8".into()))
}

/// `host/devices/{d}[/modules/{m}]`, optionally with an `amqps://` prefix; path keywords match
/// case-insensitively and ids are URL-decoded once more (the SDKs may encode them in the path).
pub fn parse_resource(resource: &str) -> Result<(String, Identity), SasError> {
    let bad = || SasError::BadResource(resource.to_owned());
    let r = resource
        .strip_prefix("amqps://")
        .or_else(|| resource.strip_prefix("AMQPS://"))
        .unwrap_or(resource);
    let mut parts = r.trim_end_matches('/').split('/');
    let host = parts.next().filter(|h| !h.is_empty()).ok_or_else(bad)?;
    let host = host.split(':').next().unwrap_or(host).to_owned();
    let segs: Vec<&str> = parts.collect();
    // C# encodes ids before encoding the whole resource, so decode them once more, and
    // edgeHub's HTTPS tokens encode them twice (`%252524edgeHub`), so up to twice more, as
    // edgeHub does; Node does not, so an id that only makes sense undecoded (`dev%2F1`) is
    // taken as it stands.
    let id = |s: &str| {
        let mut id = s.to_owned();
        for _ in 0..2 {
            match url_decode(&id) {
                Ok(d) if d != id && crate::model::identity::DeviceId::parse(&d).is_ok() => id = d,
                _ => break,
            }
        }
        id
    };
    let identity = match segs.as_slice() {
        [dv, d] if dv.eq_ignore_ascii_case("devices") => {
            Identity::Device(DeviceId::parse(&id(d)).map_err(|_| bad())?)
        }
        [dv, d, mv, m]
            if dv.eq_ignore_ascii_case("devices") && mv.eq_ignore_ascii_case("modules") =>
        {
            Identity::Module(
                DeviceId::parse(&id(d)).map_err(|_| bad())?,
                ModuleId::parse(&id(m)).map_err(|_| bad())?,
            )
        }
        _ => return Err(bad()),
    };
    Ok((host, identity))
}

/// Now, in Unix seconds.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The resource string for an identity, as the SDKs build it.
pub fn resource_for(host: &str, identity: &Identity) -> String {
    match identity {
        Identity::Device(d) => format!("{host}/devices/{d}"),
        Identity::Module(d, m) => format!("{host}/devices/{d}/modules/{m}"),
    }
}

/// Builds a token for `resource` valid until `expiry` (Unix seconds), signed with `key`.
pub fn make_token(resource: &str, key: &Key, expiry: u64, key_name: Option<&str>) -> String {
    let sr = utf8_percent_encode(resource, URI_COMPONENT).to_string();
    let sig = key.sign(format!("{sr}\n{expiry}").as_bytes());
    let sig = utf8_percent_encode(&sig, URI_COMPONENT);
    let mut t = format!("SharedAccessSignature sr={sr}&sig={sig}&se={expiry}");
    if let Some(n) = key_name {
        t.push_str("&skn=");
        t.push_str(&utf8_percent_encode(n, URI_COMPONENT).to_string());
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> KeyPair {
        KeyPair {
            primary: Key::from_base64(&B64.encode([1u8; 32])).unwrap(),
            secondary: Key::from_base64(&B64.encode([2u8; 32])).unwrap(),
        }
    }

    #[test]
    fn a_token_made_with_either_key_verifies() {
        let k = keys();
        for key in [&k.primary, &k.secondary] {
            let t = make_token(
                "hub.example/devices/d1/modules/m1",
                key,
                2_000_000_000,
                None,
            );
            let p = SasToken::parse(&t).unwrap();
            assert!(p.signed_by(&k));
            let (host, id) = p.audience().unwrap();
            assert_eq!(host, "hub.example");
            assert_eq!(id.to_string(), "d1/m1");
        }
        let other = KeyPair {
            primary: Key::from_base64(&B64.encode([3u8; 32])).unwrap(),
            secondary: Key::from_base64(&B64.encode([4u8; 32])).unwrap(),
        };
        let t = make_token(
            "hub.example/devices/d1",
            &other.primary,
            2_000_000_000,
            None,
        );
        assert!(!SasToken::parse(&t).unwrap().signed_by(&k));
    }

    #[test]
    fn node_sdk_token_verifies() {
        // Field order sr, sig, skn, se as the Node SDK writes it; the HMAC is over the raw sr.
        let k = keys();
        let sr = "hub.example%2Fdevices%2Fd1%2Fmodules%2Fm1";
        let sig = k.primary.sign(format!("{sr}\n1700000000").as_bytes());
        let sig = utf8_percent_encode(&sig, URI_COMPONENT);
        let t = format!("SharedAccessSignature sr={sr}&sig={sig}&se=1700000000");
        let p = SasToken::parse(&t).unwrap();
        assert!(p.signed_by(&k));
        // Any change to the signed text breaks it.
        let tampered = t.replace("se=1700000000", "se=1700000001");
        assert!(!SasToken::parse(&tampered).unwrap().signed_by(&k));
    }

    #[test]
    fn expiry_allows_five_minutes_of_skew() {
        let t = SasToken::parse(&make_token("h/devices/d", &keys().primary, 1000, None)).unwrap();
        assert!(!t.expired_at(1000));
        assert!(!t.expired_at(1300));
        assert!(t.expired_at(1301));
    }

    #[test]
    fn malformed_tokens_are_refused() {
        for bad in [
            "",
            "sr=a&sig=b&se=1",
            "SharedAccessSignature sr=a&sig=b",
            "SharedAccessSignature sr=a&se=1",
            "SharedAccessSignature sig=Zm9v&se=1",
            "SharedAccessSignature sr=a&sig=Zm9v&se=soon",
            "SharedAccessSignature sr=a&sig=!!!&se=1",
            "SharedAccessSignature sr=a&sig=Zm9v&se=1&se=2",
            "SharedAccessSignature sr=a&sig=Zm9v&se=1&x=2",
            "SharedAccessSignature sr",
        ] {
            assert!(
                matches!(SasToken::parse(bad), Err(SasError::Malformed(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn resources_name_devices_and_modules() {
        let ok = [
            ("h/devices/d", "d"),
            ("h/DEVICES/d/Modules/m", "d/m"),
            ("amqps://h:5671/devices/d/modules/%24edgeHub", "d/$edgeHub"),
            ("h/devices/dev%252F1", "dev%2F1"),
            // edgeHub's HTTPS tokens: ids encoded twice, the resource once more.
            (
                "h%2Fdevices%2Fedge1%2Fmodules%2F%252524edgeHub",
                "edge1/$edgeHub",
            ),
        ];
        for (r, want) in ok {
            let decoded = url_decode(r).unwrap();
            assert_eq!(parse_resource(&decoded).unwrap().1.to_string(), want, "{r}");
        }
        for r in [
            "h",
            "h/devices",
            "h/devices/d/modules",
            "h/things/d",
            "/devices/d",
            "h/devices/d/modules/m/x",
        ] {
            assert!(parse_resource(r).is_err(), "{r}");
        }
    }
}
