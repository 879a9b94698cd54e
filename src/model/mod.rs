//! The model: the values every layer passes around. Identities and keys, SAS tokens, link
//! addresses and the hub's message. Plain data and pure functions; no IO, no state.

pub mod address;
pub mod identity;
pub mod message;
pub mod sas;
pub mod time;
pub mod x509;

/// Longest client-supplied text put in a log line.
pub const LOG_CLIP: usize = 128;

/// `s` cut to [`LOG_CLIP`] characters, for log lines that quote what a client sent.
pub fn clip(s: &str) -> std::borrow::Cow<'_, str> {
    match s.char_indices().nth(LOG_CLIP) {
        None => std::borrow::Cow::Borrowed(s),
        Some((at, _)) => std::borrow::Cow::Owned(format!("{}… ({} bytes)", &s[..at], s.len())),
    }
}
