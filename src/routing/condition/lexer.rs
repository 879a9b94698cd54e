//! The lexer: GrammarLexer.g4 as ANTLR runs it (longest match, ties to the rule defined first).

use super::*;

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Tok {
    /// A terminated string literal, unescaped.
    Str(String),
    /// A number literal; None when .NET cannot parse it (`e5`, 17+ hex digits): edgeHub
    /// then compiles the literal as `undefined`.
    Num(Option<f64>),
    True,
    False,
    Null,
    Undefined,
    And,
    Or,
    Not,
    LParen,
    RParen,
    Comma,
    LBrace,
    RBrace,
    Plus,
    Minus,
    Star,
    Slash,
    Percent,
    Concat,
    Coalesce,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    /// `$name`, text including the `$`.
    SysProp(String),
    Id(String),
}

#[derive(Debug, Clone)]
pub(super) struct Token {
    pub(super) tok: Tok,
    pub(super) start: usize,
    pub(super) end: usize,
}

/// What may follow `$` (GrammarLexer `QUERY_PATH_CHARS`).
pub(super) fn is_query_path_char(c: char) -> bool {
    !matches!(
        c,
        '(' | ')'
            | '<'
            | '>'
            | '@'
            | ','
            | ';'
            | ':'
            | '\\'
            | '"'
            | '/'
            | '?'
            | '='
            | '{'
            | '}'
            | ' '
            | '\t'
            | '\n'
            | '\r'
    )
}

/// Identifier characters (GrammarLexer `ID_CHARS`): query-path characters except brackets.
pub(super) fn is_id_char(c: char) -> bool {
    is_query_path_char(c) && c != '[' && c != ']'
}

pub(super) fn is_ws(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\n')
}

/// Byte length of the longest prefix of `s` whose characters satisfy `pred`.
pub(super) fn run_len(s: &str, pred: impl Fn(char) -> bool) -> usize {
    s.char_indices()
        .find(|&(_, c)| !pred(c))
        .map_or(s.len(), |(i, _)| i)
}

pub(super) fn digits_len(b: &[u8]) -> usize {
    b.iter().take_while(|c| c.is_ascii_digit()).count()
}

pub(super) fn tail(b: &[u8], from: usize) -> &[u8] {
    b.get(from..).unwrap_or(&[])
}

/// `[eE] [+-]? [0-9]+`
pub(super) fn exp_len(b: &[u8]) -> usize {
    if !matches!(b.first(), Some(b'e' | b'E')) {
        return 0;
    }
    let sign = usize::from(matches!(b.get(1), Some(b'+' | b'-')));
    let d = digits_len(tail(b, 1 + sign));
    if d == 0 {
        0
    } else {
        1 + sign + d
    }
}

/// `INTEGER_LITERAL: '-'? [0-9]+`
pub(super) fn int_len(b: &[u8]) -> usize {
    let sign = usize::from(b.first() == Some(&b'-'));
    let d = digits_len(tail(b, sign));
    if d == 0 {
        0
    } else {
        sign + d
    }
}

/// `HEX_INTEGER_LITERAL: '0' [Xx] HEX_DIGIT+`
pub(super) fn hex_len(b: &[u8]) -> usize {
    if b.first() != Some(&b'0') || !matches!(b.get(1), Some(b'x' | b'X')) {
        return 0;
    }
    let d = tail(b, 2)
        .iter()
        .take_while(|c| c.is_ascii_hexdigit())
        .count();
    if d == 0 {
        0
    } else {
        2 + d
    }
}

/// `REAL_LITERAL: '-'? [0-9]* '.' [0-9]+ EXP? | '-'? [0-9]* EXP`
pub(super) fn real_len(b: &[u8]) -> usize {
    let sign = usize::from(b.first() == Some(&b'-'));
    let p = sign + digits_len(tail(b, sign));
    let mut best = 0;
    if b.get(p) == Some(&b'.') {
        let f = digits_len(tail(b, p + 1));
        if f > 0 {
            let q = p + 1 + f;
            best = q + exp_len(tail(b, q));
        }
    }
    let e = exp_len(tail(b, p));
    if e > 0 {
        best = best.max(p + e);
    }
    best
}

/// VisitHex: `long.TryParse(digits, HexNumber)`: leading zeros are skipped, at most 16
/// significant digits, and the bits are read as a signed 64-bit number.
pub(super) fn hex_value(digits: &str) -> Option<f64> {
    let significant = digits.trim_start_matches('0');
    if significant.len() > 16 {
        return None;
    }
    if significant.is_empty() {
        return Some(0.0);
    }
    let bits = u64::from_str_radix(significant, 16).ok()?;
    Some(i64::from_ne_bytes(bits.to_ne_bytes()) as f64)
}

/// Scans a quoted string: `Ok(len)` of the STRING match when terminated, else `Err(len)` of
/// the UNTERMINATED_STRING match (which stops before an invalid escape).
pub(super) fn scan_string(rest: &str) -> Result<usize, usize> {
    let mut chars = rest.char_indices();
    let Some((_, quote)) = chars.next() else {
        return Err(0);
    };
    while let Some((i, c)) = chars.next() {
        if c == quote {
            return Ok(i + 1);
        }
        if c == '\\' {
            match chars.next() {
                Some((_, '"' | '\'' | '\\')) => {}
                Some((_, 'u')) => {
                    for _ in 0..4 {
                        match chars.next() {
                            Some((_, h)) if h.is_ascii_hexdigit() => {}
                            _ => return Err(i),
                        }
                    }
                }
                _ => return Err(i),
            }
        }
    }
    Err(rest.len())
}

/// ConditionVisitor.Unescape: two regex passes over the UTF-16 text, first `\uXXXX` (either
/// case of `u`), then `\"`, `\'`, `\\`. Running them one after the other is edgeHub's quirk
/// (`"\\u0041"` becomes `\A`), kept so strings compare the same.
pub(super) fn unescape(raw: &str) -> String {
    let units: Vec<u16> = raw.encode_utf16().collect();
    let backslash = u16::from(b'\\');
    let mut pass1 = Vec::with_capacity(units.len());
    let mut i = 0;
    while let Some(&u) = units.get(i) {
        let is_u =
            matches!(units.get(i + 1), Some(&c) if c == u16::from(b'u') || c == u16::from(b'U'));
        let hex = units.get(i + 2..i + 6).and_then(|h| {
            let s = String::from_utf16(h).ok()?;
            if s.len() == 4 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
                u16::from_str_radix(&s, 16).ok()
            } else {
                None
            }
        });
        match (u == backslash && is_u, hex) {
            (true, Some(v)) => {
                pass1.push(v);
                i += 6;
            }
            _ => {
                pass1.push(u);
                i += 1;
            }
        }
    }
    let mut pass2 = Vec::with_capacity(pass1.len());
    let mut i = 0;
    while let Some(&u) = pass1.get(i) {
        match pass1.get(i + 1) {
            Some(&n)
                if u == backslash
                    && (n == u16::from(b'"') || n == u16::from(b'\'') || n == backslash) =>
            {
                pass2.push(n);
                i += 2;
            }
            _ => {
                pass2.push(u);
                i += 1;
            }
        }
    }
    String::from_utf16_lossy(&pass2)
}

pub(super) enum Cand {
    Tok(Tok),
    Reserved,
    Str(usize),
    Unterminated,
    Int,
    Hex,
    Real,
    SysProp,
    Id,
    QueryPath,
}

/// The token at the start of `rest`: every lexer rule that matches is offered in rule order
/// and only a strictly longer match replaces the best, which is ANTLR's longest-match,
/// first-rule-wins choice.
pub(super) fn next_token(rest: &str) -> Result<(usize, Tok), String> {
    let bytes = rest.as_bytes();
    let id_len = run_len(rest, is_id_char);
    let word = rest.get(..id_len).unwrap_or("");
    let mut best: Option<(usize, Cand)> = None;
    let mut offer = |len: usize, cand: Cand| {
        if len > 0 && best.as_ref().is_none_or(|(l, _)| len > *l) {
            best = Some((len, cand));
        }
    };

    // Implicit tokens of the parser grammar come first.
    match bytes.first() {
        Some(b'{') => offer(1, Cand::Tok(Tok::LBrace)),
        Some(b'}') => offer(1, Cand::Tok(Tok::RBrace)),
        _ => {}
    }
    // SELECT FROM WHERE INTO belong to the route grammar; in a condition they are errors.
    if ["select", "from", "where", "into"]
        .iter()
        .any(|k| word.eq_ignore_ascii_case(k))
    {
        offer(id_len, Cand::Reserved);
    }
    if matches!(bytes.first(), Some(b'"' | b'\'')) {
        match scan_string(rest) {
            Ok(len) => offer(len, Cand::Str(len)),
            Err(len) => offer(len, Cand::Unterminated),
        }
    }
    offer(int_len(bytes), Cand::Int);
    offer(hex_len(bytes), Cand::Hex);
    offer(real_len(bytes), Cand::Real);
    for (kw, tok) in [
        ("true", Tok::True),
        ("false", Tok::False),
        ("null", Tok::Null),
        ("undefined", Tok::Undefined),
    ] {
        if word == kw {
            offer(id_len, Cand::Tok(tok));
        }
    }
    let single = match bytes.first() {
        Some(b'(') => Some(Tok::LParen),
        Some(b')') => Some(Tok::RParen),
        Some(b',') => Some(Tok::Comma),
        Some(b'+') => Some(Tok::Plus),
        Some(b'-') => Some(Tok::Minus),
        Some(b'*') => Some(Tok::Star),
        Some(b'/') => Some(Tok::Slash),
        Some(b'%') => Some(Tok::Percent),
        _ => None,
    };
    if let Some(tok) = single {
        offer(1, Cand::Tok(tok));
    }
    for (kw, tok) in [("and", Tok::And), ("or", Tok::Or), ("not", Tok::Not)] {
        if word.eq_ignore_ascii_case(kw) {
            offer(id_len, Cand::Tok(tok));
        }
    }
    let double = match bytes.get(..2) {
        Some(b"!=") | Some(b"<>") => Some(Tok::Ne),
        Some(b"<=") => Some(Tok::Le),
        Some(b">=") => Some(Tok::Ge),
        Some(b"||") => Some(Tok::Concat),
        Some(b"??") => Some(Tok::Coalesce),
        _ => None,
    };
    let single = match bytes.first() {
        Some(b'=') => Some(Tok::Eq),
        Some(b'<') => Some(Tok::Lt),
        Some(b'>') => Some(Tok::Gt),
        _ => None,
    };
    if let Some(tok) = single {
        offer(1, Cand::Tok(tok));
    }
    if let Some(tok) = double {
        offer(2, Cand::Tok(tok));
    }
    if bytes.first() == Some(&b'$') {
        let n = run_len(rest.get(1..).unwrap_or(""), is_query_path_char);
        if n > 0 {
            offer(1 + n, Cand::SysProp);
        }
    }
    offer(id_len, Cand::Id);
    offer(run_len(rest, is_query_path_char), Cand::QueryPath);

    let Some((len, cand)) = best else {
        let c = rest.chars().next().unwrap_or(' ');
        return Err(format!("invalid symbol '{c}'"));
    };
    let text = rest.get(..len).unwrap_or("");
    let tok = match cand {
        Cand::Tok(tok) => tok,
        Cand::Reserved => return Err(format!("'{text}' is a reserved word")),
        Cand::Unterminated => return Err("unterminated string".to_owned()),
        Cand::QueryPath => {
            return Err(format!(
                "unexpected '{text}': '[' and ']' are only allowed in a $ property"
            ))
        }
        Cand::Str(len) => Tok::Str(unescape(rest.get(1..len - 1).unwrap_or(""))),
        // VisitInteger/VisitReal use double.TryParse(NumberStyles.Any); for these lexemes
        // Rust's parser agrees, including `e5` failing and overflow giving infinity.
        Cand::Int | Cand::Real => Tok::Num(text.parse::<f64>().ok()),
        Cand::Hex => Tok::Num(hex_value(text.get(2..).unwrap_or(""))),
        Cand::SysProp => Tok::SysProp(text.to_owned()),
        Cand::Id => Tok::Id(text.to_owned()),
    };
    Ok((len, tok))
}

pub(super) fn lex(src: &str) -> Result<Vec<Token>, ConditionError> {
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(rest) = src.get(i..) {
        let Some(c) = rest.chars().next() else {
            break;
        };
        if is_ws(c) {
            i += c.len_utf8();
            continue;
        }
        if rest.starts_with("/*") {
            match rest.get(2..).and_then(|r| r.find("*/")) {
                Some(end) => {
                    i += 2 + end + 2;
                    continue;
                }
                // ANTLR would lex `/` `*` …, which never parses; say what is wrong instead.
                None => return Err(ConditionError::new(i, "unterminated comment")),
            }
        }
        let (len, tok) = next_token(rest).map_err(|m| ConditionError::new(i, m))?;
        out.push(Token {
            tok,
            start: i,
            end: i + len,
        });
        i += len;
    }
    Ok(out)
}

pub(super) fn describe(tok: &Token, src: &str) -> String {
    format!("'{}'", src.get(tok.start..tok.end).unwrap_or("?"))
}
