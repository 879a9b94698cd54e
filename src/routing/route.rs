//! Route statements: `[SELECT *] FROM <source> [WHERE <condition>] INTO <sink>`.
//!
//! Parsing is pure and happens once, when the config is compiled; the router only evaluates the
//! parsed [`Route`]s. Source matching follows edgeHub: the route's source loses its trailing `*`
//! and `/`, both sides get exactly one trailing `/`, and the message source must start with the
//! route source, case-insensitively, so matches fall on whole segments.

use std::fmt;

use crate::{model::identity::ModuleId, routing::condition::Condition};

/// Priority of a route without one: lower than every explicit priority (0–9).
pub const DEFAULT_PRIORITY: u32 = 2_000_000_000;

/// Where a route sends messages.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Sink {
    /// `$upstream`: IoT Hub, or the parent hub.
    Upstream,
    /// `BrokeredEndpoint("/modules/{module}/inputs/{input}")` on this hub.
    ModuleInput { module: ModuleId, input: String },
}

impl fmt::Display for Sink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Sink::Upstream => f.write_str("$upstream"),
            Sink::ModuleInput { module, input } => {
                write!(f, "BrokeredEndpoint(\"/modules/{module}/inputs/{input}\")")
            }
        }
    }
}

/// A parsed route statement.
#[derive(Debug, Clone)]
pub struct Statement {
    /// The source with trailing `*` and `/` removed, then one `/` added, lower-cased.
    pub source_prefix: String,
    /// The source as written.
    pub source: String,
    /// The compiled WHERE condition, if any.
    pub condition: Option<Condition>,
    pub sink: Sink,
}

/// A route as configured: a statement plus its priority and TTL.
#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    pub statement: Statement,
    /// 0 is the highest; [`DEFAULT_PRIORITY`] when not set.
    pub priority: u32,
    /// Seconds; 0 means the global TTL.
    pub time_to_live_secs: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RouteError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, RouteError> {
    Err(RouteError(msg.into()))
}

/// Finds keyword `kw` (case-insensitive, as a whole word) outside quotes, at or after `from`.
fn find_keyword(s: &str, kw: &str, from: usize, last: bool) -> Option<usize> {
    let bytes = s.as_bytes();
    let mut quote: Option<u8> = None;
    let mut found = None;
    let mut i = from;
    while i < bytes.len() {
        let c = bytes[i];
        match quote {
            Some(q) => {
                if c == b'\\' {
                    i += 1;
                } else if c == q {
                    quote = None;
                }
            }
            None => {
                if c == b'\'' || c == b'"' {
                    quote = Some(c);
                } else if s.len() >= i + kw.len()
                    && s.is_char_boundary(i)
                    && s.is_char_boundary(i + kw.len())
                    && s[i..i + kw.len()].eq_ignore_ascii_case(kw)
                {
                    let before_ok = i == 0 || !is_word(bytes[i - 1]);
                    let after_ok = i + kw.len() == bytes.len() || !is_word(bytes[i + kw.len()]);
                    if before_ok && after_ok {
                        found = Some(i);
                        if !last {
                            return found;
                        }
                    }
                }
            }
        }
        i += 1;
    }
    found
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$'
}

/// Parses a route statement.
pub fn parse_statement(text: &str) -> Result<Statement, RouteError> {
    let s = text.trim();
    let mut rest = s;
    // Optional SELECT *
    // `get` rather than indexing: the text may have multi-byte characters anywhere.
    let starts_with_keyword = |s: &str, kw: &str| {
        s.get(..kw.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(kw))
    };
    if starts_with_keyword(rest, "select") {
        let after = rest[6..].trim_start();
        let Some(after) = after.strip_prefix('*') else {
            return err("only `SELECT *` is supported");
        };
        rest = after.trim_start();
    }
    if !(rest.len() >= 4
        && starts_with_keyword(rest, "from")
        && rest[4..].starts_with(char::is_whitespace))
    {
        return err("a route must start with `FROM <source>` (optionally after `SELECT *`)");
    }
    rest = rest[4..].trim_start();
    let Some(into_at) = find_keyword(rest, "into", 0, true) else {
        return err("missing `INTO <sink>`");
    };
    let (head, sink_text) = (&rest[..into_at], rest[into_at + 4..].trim());
    let (source, condition) = match find_keyword(head, "where", 0, false) {
        Some(w) => {
            let raw = &head[w + 5..];
            let cond = raw.trim();
            if cond.is_empty() {
                return err("`WHERE` needs a condition");
            }
            // Positions in errors count from the start of the whole route text.
            let offset = (s.len() - rest.len()) + w + 5 + (raw.len() - raw.trim_start().len());
            let compiled = Condition::parse(cond).map_err(|e| {
                RouteError(format!(
                    "condition error at position {}: {}",
                    offset + e.position + (text.len() - text.trim_start().len()),
                    e.message
                ))
            })?;
            (head[..w].trim(), Some(compiled))
        }
        None => (head.trim(), None),
    };
    let source_prefix = parse_source(source)?;
    if condition.as_ref().is_some_and(Condition::uses_twin_change)
        && !source
            .trim_end_matches(['*', '/'])
            .eq_ignore_ascii_case("/twinChangeNotifications")
    {
        return err("twin_change_includes can only be used with FROM /twinChangeNotifications");
    }
    let sink = parse_sink(sink_text)?;
    Ok(Statement {
        source_prefix,
        source: source.to_owned(),
        condition,
        sink,
    })
}

fn parse_source(source: &str) -> Result<String, RouteError> {
    if !source.starts_with('/') {
        return err(format!("source {source:?} must start with '/'"));
    }
    let items: Vec<&str> = source[1..].split('/').collect();
    for (i, item) in items.iter().enumerate() {
        let last = i + 1 == items.len();
        let ok = *item == "*"
            || (!item.is_empty()
                && item
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.:$%@".contains(c)))
            || (last && item.is_empty() && i > 0);
        if !ok {
            return err(format!("source {source:?} has an invalid segment {item:?}"));
        }
    }
    let trimmed = source.trim_end_matches(['*', '/']);
    Ok(format!("{}/", trimmed.to_ascii_lowercase()))
}

fn parse_sink(text: &str) -> Result<Sink, RouteError> {
    if text.eq_ignore_ascii_case("$upstream") {
        return Ok(Sink::Upstream);
    }
    if text.starts_with('$') {
        return err(format!(
            "system endpoint {text:?} is not supported (only $upstream)"
        ));
    }
    let Some(open) = text.find('(') else {
        return err(format!(
            "sink {text:?} is neither $upstream nor BrokeredEndpoint(\"…\")"
        ));
    };
    let func = text[..open].trim();
    if !func.eq_ignore_ascii_case("BrokeredEndpoint") {
        return err(format!(
            "endpoint type {func:?} is not supported (only BrokeredEndpoint)"
        ));
    }
    let arg = text[open + 1..].trim();
    let Some(arg) = arg.strip_suffix(')') else {
        return err("BrokeredEndpoint( is not closed");
    };
    let arg = arg.trim();
    let quote = arg.chars().next();
    let inner = match quote {
        Some(q @ ('"' | '\'')) if arg.len() >= 2 && arg.ends_with(q) => &arg[1..arg.len() - 1],
        _ => return err("BrokeredEndpoint takes one quoted string"),
    };
    let segs: Vec<&str> = inner.trim_matches('/').split('/').collect();
    match segs.as_slice() {
        [m, module, i, input]
            if m.eq_ignore_ascii_case("modules")
                && i.eq_ignore_ascii_case("inputs")
                && !input.is_empty() =>
        {
            let module = ModuleId::parse(module).map_err(|e| {
                RouteError(format!("module id {module:?} in BrokeredEndpoint: {e}"))
            })?;
            Ok(Sink::ModuleInput {
                module,
                input: (*input).to_owned(),
            })
        }
        _ => err(format!(
            "BrokeredEndpoint({inner:?}) must be \"/modules/<module>/inputs/<input>\""
        )),
    }
}

impl Statement {
    /// Does a message with source path `source` (e.g. `/messages/modules/a/outputs/o1`) match?
    pub fn matches_source(&self, source: &str) -> bool {
        let mut s = source.trim_end_matches('/').to_ascii_lowercase();
        s.push('/');
        s.starts_with(&self.source_prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(m: &str, i: &str) -> Sink {
        Sink::ModuleInput {
            module: ModuleId::parse(m).unwrap(),
            input: i.into(),
        }
    }

    #[test]
    fn valid_statements() {
        let cases = [
            ("FROM /messages/* INTO $upstream", "/messages/", None, Sink::Upstream),
            ("select * from /* into $Upstream", "/", None, Sink::Upstream),
            (
                "FROM /messages/modules/a/outputs/out1 INTO BrokeredEndpoint(\"/modules/b/inputs/in1\")",
                "/messages/modules/a/outputs/out1/",
                None,
                input("b", "in1"),
            ),
            (
                "FROM /messages/modules/a/* WHERE as_number(temp) > 10 INTO brokeredendpoint('/modules/b/inputs/in 1')",
                "/messages/modules/a/",
                Some("as_number(temp) > 10"),
                input("b", "in 1"),
            ),
            (
                "FROM /messages WHERE note = 'goes INTO the hub' INTO $upstream",
                "/messages/",
                Some("note = 'goes INTO the hub'"),
                Sink::Upstream,
            ),
            ("FROM /twinChangeNotifications INTO $upstream", "/twinchangenotifications/", None, Sink::Upstream),
        ];
        for (text, prefix, cond, sink) in cases {
            let s = parse_statement(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(s.source_prefix, prefix, "{text}");
            assert_eq!(s.condition.as_ref().map(|c| c.as_str()), cond, "{text}");
            assert_eq!(s.sink, sink, "{text}");
        }
    }

    #[test]
    fn invalid_statements() {
        for text in [
            "",
            "INTO $upstream",
            "FROM /messages",
            "FROM messages INTO $upstream",
            "FROM /messages INTO $local",
            "FROM /messages INTO Storage(\"x\")",
            "FROM /messages INTO BrokeredEndpoint(\"/modules/b/outputs/o\")",
            "FROM /messages INTO BrokeredEndpoint(\"/modules/b/inputs\")",
            "FROM /messages INTO BrokeredEndpoint(/modules/b/inputs/i)",
            "FROM /messages INTO BrokeredEndpoint(\"/modules/b/inputs/i\"",
            "FROM /messages WHERE INTO $upstream",
            "SELECT a FROM /messages INTO $upstream",
            "FROM /mess ages INTO $upstream",
            "FROM //x INTO $upstream",
            "1>/\u{2c1}?*",
            "sel\u{e9}ct * FROM /x INTO $upstream",
            "fro\u{e9} /x INTO $upstream",
            "FROM /messages WHERE nosuchfn(1) INTO $upstream",
            "FROM /messages WHERE (a = 'b' INTO $upstream",
            "FROM /messages WHERE twin_change_includes(properties.reported.x) INTO $upstream",
        ] {
            assert!(parse_statement(text).is_err(), "{text:?} should not parse");
        }
    }

    #[test]
    fn condition_errors_name_their_position_in_the_route() {
        let e = parse_statement("FROM /messages WHERE a = 'x' AND nosuch(1) INTO $upstream")
            .unwrap_err();
        assert!(e.0.contains("position 33"), "{e}");
        assert!(parse_statement("FROM /twinChangeNotifications WHERE twin_change_includes(properties.reported.x) INTO $upstream").is_ok());
    }

    #[test]
    fn sources_match_on_whole_segments() {
        let m = |src: &str, msg: &str| {
            parse_statement(&format!("FROM {src} INTO $upstream"))
                .unwrap()
                .matches_source(msg)
        };
        let out = "/messages/modules/a/outputs/o1";
        let none = "/messages/modules/a";
        let leaf = "/messages";
        let twin = "/twinChangeNotifications";
        assert!(m("/*", out) && m("/*", twin) && m("/*", leaf));
        assert!(
            m("/messages/*", out)
                && m("/messages/*", none)
                && m("/messages/*", leaf)
                && !m("/messages/*", twin)
        );
        assert!(
            m("/messages/modules/*", out)
                && m("/messages/modules/*", none)
                && !m("/messages/modules/*", leaf)
        );
        assert!(m("/messages/modules/a/*", out) && m("/messages/modules/a/*", none));
        assert!(!m("/messages/modules/ab/*", none), "whole segments only");
        assert!(
            !m("/messages/modules/a/*", "/messages/modules/ab"),
            "whole segments only"
        );
        assert!(
            m("/messages/modules/a/outputs/*", out) && !m("/messages/modules/a/outputs/*", none)
        );
        assert!(m("/messages/modules/A/outputs/O1", out), "case-insensitive");
        assert!(!m("/messages/modules/a/outputs/o", out));
        assert!(m("/twinChangeNotifications", twin) && !m("/twinChangeNotifications", out));
    }
}
