//! Walking the config's JSON by hand: typed reads of keys that record every problem with its
//! path instead of stopping at the first.

use std::net::SocketAddr;

use serde_json::{Map, Value};

use super::ConfigError;
use crate::model::identity::{Key, KeyPair};

/// Collects errors while walking the JSON.
pub(super) struct Walk {
    pub(super) errors: Vec<ConfigError>,
}

pub(super) fn child(path: &str, key: &str) -> String {
    if key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && !key.is_empty() {
        format!("{path}.{key}")
    } else {
        format!("{path}[{}]", Value::String(key.to_owned()))
    }
}

impl Walk {
    pub(super) fn err(&mut self, path: &str, message: impl Into<String>) {
        self.errors.push(ConfigError {
            path: path.to_owned(),
            message: message.into(),
        });
    }

    pub(super) fn object<'a>(
        &mut self,
        v: &'a Value,
        path: &str,
        known: &[&str],
    ) -> Option<&'a Map<String, Value>> {
        match v.as_object() {
            Some(o) => {
                for k in o.keys() {
                    if !known.contains(&k.as_str()) {
                        self.err(
                            &child(path, k),
                            format!("unknown key (expected one of: {})", known.join(", ")),
                        );
                    }
                }
                Some(o)
            }
            None => {
                self.err(path, "must be an object");
                None
            }
        }
    }

    pub(super) fn string<'a>(
        &mut self,
        o: &'a Map<String, Value>,
        path: &str,
        key: &str,
        required: bool,
    ) -> Option<&'a str> {
        match o.get(key) {
            None | Some(Value::Null) => {
                if required {
                    self.err(&child(path, key), "is required");
                }
                None
            }
            Some(Value::String(s)) if !s.trim().is_empty() => Some(s),
            Some(_) => {
                self.err(&child(path, key), "must be a non-empty string");
                None
            }
        }
    }

    pub(super) fn uint(
        &mut self,
        o: &Map<String, Value>,
        path: &str,
        key: &str,
        max: u64,
    ) -> Option<u64> {
        match o.get(key) {
            None => None,
            Some(v) => match v.as_u64() {
                Some(n) if n <= max => Some(n),
                _ => {
                    self.err(
                        &child(path, key),
                        format!("must be an integer from 0 to {max}"),
                    );
                    None
                }
            },
        }
    }

    pub(super) fn addr(
        &mut self,
        o: &Map<String, Value>,
        path: &str,
        key: &str,
        required: bool,
    ) -> Option<SocketAddr> {
        if !required && matches!(o.get(key), Some(Value::Null)) {
            return None;
        }
        let s = self.string(o, path, key, required)?;
        match s.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.err(
                    &child(path, key),
                    format!("{s:?} is not an address like \"0.0.0.0:5671\""),
                );
                None
            }
        }
    }

    /// `primaryKey` and `secondaryKey` (which defaults to the primary key).
    pub(super) fn key_pair(
        &mut self,
        o: &Map<String, Value>,
        path: &str,
        required: bool,
    ) -> Option<KeyPair> {
        let primary = self.key(o, path, "primaryKey");
        let secondary = self.key(o, path, "secondaryKey");
        let absent = |k: &str| matches!(o.get(k), None | Some(Value::Null));
        if absent("primaryKey") {
            if required {
                self.err(&child(path, "primaryKey"), "is required");
            } else if !absent("secondaryKey") {
                self.err(
                    &child(path, "primaryKey"),
                    "is required when secondaryKey is set",
                );
            }
            return None;
        }
        let primary = primary?;
        Some(KeyPair {
            secondary: secondary.unwrap_or_else(|| primary.clone()),
            primary,
        })
    }

    pub(super) fn key(&mut self, o: &Map<String, Value>, path: &str, key: &str) -> Option<Key> {
        let s = self.string(o, path, key, false)?;
        match Key::from_base64(s) {
            Ok(k) => Some(k),
            Err(e) => {
                self.err(&child(path, key), e);
                None
            }
        }
    }
}

pub(super) fn hostname_ok(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}
