//! The transports: adapters that turn frames into core calls and core events into frames.

pub mod amqp;
pub mod http;
pub mod mqtt;
pub mod upstream;

/// Longest client-supplied text put in a log line.
const LOG_CLIP: usize = 128;

/// `s` cut to [`LOG_CLIP`] characters, for log lines that quote what a client sent (every
/// transport's).
pub(crate) fn clip(s: &str) -> std::borrow::Cow<'_, str> {
    match s.char_indices().nth(LOG_CLIP) {
        None => std::borrow::Cow::Borrowed(s),
        Some((at, _)) => std::borrow::Cow::Owned(format!("{}… ({} bytes)", &s[..at], s.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_text_in_log_lines_is_clipped() {
        assert_eq!(clip("short"), "short");
        let long = "é".repeat(1000);
        let c = clip(&long);
        assert!(c.starts_with(&"é".repeat(LOG_CLIP)));
        assert!(c.ends_with("(2000 bytes)"), "{c}");
        assert!(c.len() < 2 * LOG_CLIP + 32);
    }
}
