//! Route conditions: the `<condition>` in `FROM <source> WHERE <condition> INTO <sink>`.
//!
//! [`Condition::parse`] lexes, parses and type-checks the text once, into a tree that
//! [`Condition::evaluate`] walks for each message; nothing is re-parsed per message. What a
//! condition reads from a message (properties, body paths) are its lookups, each made at most
//! once per message and only when the evaluation gets to it. A [`ConditionSet`] (the router's
//! routes) shares lookups and repeated subexpressions among all its conditions, so a property
//! or a test that many routes use costs one lookup or one evaluation per message.
//!
//! The language and its semantics are edgeHub's (Azure/iotedge `Routing.Core`:
//! `grammar/Condition.g4`, `grammar/GrammarLexer.g4`, `query/ConditionVisitor.cs`,
//! `query/builtins/*.cs`, `query/jsonpath/JsonPath.g4`, Newtonsoft's `SelectTokens` for body
//! paths). A route that edgeHub accepts is accepted here and selects the same messages; a route
//! that edgeHub rejects is a [`ConditionError`]. What that means in practice:
//!
//! * **Tokens follow ANTLR's rules**: the longest match wins and ties go to the rule defined
//!   first. An identifier may contain `+ - * % ! | & . '` and more, so `a+b` is ONE property
//!   named `a+b` and `3-1` is a property too: operators need spaces (`3 - 1`). Only space, tab,
//!   CR and LF separate tokens; `/* … */` comments are ignored.
//! * **Static types.** edgeHub compiles a condition to a typed expression tree. Application and
//!   system properties are strings, literals have their own types, and `$body` queries are
//!   typed per message. Operands of the wrong type are a compile error: `temp > 30` with `temp`
//!   an application property is rejected (write `as_number(temp) > 30`), and so is `NOT name`
//!   on a string. Each rule is documented where it is checked.
//! * **Three-valued logic.** `undefined` (an absent property, a failed conversion, NaN) makes
//!   comparisons and arithmetic undefined. `AND`/`OR` are Kleene: `false AND undefined` is
//!   `false`, `true OR undefined` is `true`. A route is taken only when the condition is
//!   `true`.
//! * **Body paths** (`$body.a.b[0]`) select JSON values: a path that selects nothing is
//!   `null`, while objects, arrays and strings Newtonsoft reads as dates are `undefined`.
//! * **`twin_change_includes(properties.reported.x)`** takes the path unquoted; a quoted path
//!   does not compile in edgeHub.
//!
//! Invariants: parsing never panics on any input (it is fuzzed); parentheses, calls and prefix
//! operators nest at most [`MAX_NESTING`] deep and the expression tree is at most
//! [`MAX_DEPTH`] deep, so neither parsing nor evaluation can overflow the stack. Evaluation is
//! pure: it only reads the message through [`MessageView`].

use std::borrow::Cow;
use std::cell::{Cell, OnceCell};
use std::cmp::Ordering;
use std::collections::HashMap;
use std::fmt;

/// Deepest nesting of parentheses, function calls and prefix operators.
pub const MAX_NESTING: usize = 64;
/// Deepest expression tree; long `a AND b AND …` chains grow the tree on the left.
pub const MAX_DEPTH: usize = 256;

/// A value during evaluation.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Undefined,
    Null,
    Bool(bool),
    Number(f64),
    String(String),
}

/// What a condition can look at in a message. Implemented by the hub's message type elsewhere.
///
/// edgeHub keeps both property maps in dictionaries with `StringComparer.OrdinalIgnoreCase`
/// (`Routing.Core/Message.cs`), so `KEY1` finds `key1`: implementations must look names up
/// ignoring (at least ASCII) case. Conditions rely on it: names that differ only in ASCII case
/// are looked up once for all of them.
pub trait MessageView {
    /// Application property by name (strings, numbers, bools as the client sent them).
    ///
    /// edgeHub keeps only string application properties: any other AMQP value is stored as a
    /// null string (`property.Value as string` in `AmqpMessageConverter.cs`). This module does
    /// the same with every non-`String` value: the property is defined, `is_null` of it is
    /// true, it concatenates as `""` and compares as undefined. `Some(Value::Undefined)` counts
    /// as absent.
    fn app_property(&self, name: &str) -> Option<Value>;
    /// System property by edgeHub's name without `$`: messageId, correlationId, userId, to,
    /// contentType, contentEncoding, connectionDeviceId, connectionModuleId, outputName,
    /// enqueuedTime, ... (return None when absent).
    ///
    /// edgeHub stores every system property as a string, so implementations should return
    /// `Value::String`; other values behave as for [`MessageView::app_property`].
    fn system_property(&self, name: &str) -> Option<Value>;
    /// The message body parsed as JSON, when the content type/encoding allow body queries;
    /// None otherwise. (The caller decides the content-type/encoding gate and parses lazily.)
    ///
    /// edgeHub's gate: system properties `contentType` equal to `application/json` and
    /// `contentEncoding` one of `utf-8`, `utf-16`, `utf-32` (both required, both compared
    /// ignoring case; UTF-16 and UTF-32 are little-endian), and a body that decodes and parses.
    /// A top-level value that is not an object makes every body query undefined (edgeHub uses
    /// `JObject.Parse`); this module checks that itself.
    fn body_json(&self) -> Option<&serde_json::Value>;
    /// For twin change notifications: the notification body as JSON (for twin_change_includes);
    /// None for other messages.
    fn twin_change(&self) -> Option<&serde_json::Value>;

    /// [`MessageView::app_property`] without copying: implementations that can lend the
    /// string should override this (the evaluator calls it on every property reference).
    fn app_property_ref(&self, name: &str) -> Option<Prop<'_>> {
        self.app_property(name).map(Prop::from)
    }

    /// [`MessageView::system_property`] without copying.
    fn system_property_ref(&self, name: &str) -> Option<Prop<'_>> {
        self.system_property(name).map(Prop::from)
    }

    /// The text that [`MessageView::body_json`] parses, when the gate lets `$body` queries
    /// read it. Implementations that offer it let a [`ConditionSet`] read the values of all
    /// its plain body paths (names and indexes, no `*`) in one pass over the text, without
    /// building the document; with None, every body query reads `body_json`.
    fn body_text(&self) -> Option<&str> {
        None
    }
}

/// A property value as the evaluator reads it: a string (borrowed when possible), a value that
/// is not a string (a null string to edgeHub), or undefined (treated as absent).
#[derive(Debug, Clone, PartialEq)]
pub enum Prop<'a> {
    Str(Cow<'a, str>),
    NotString,
    Undefined,
}

impl From<Value> for Prop<'_> {
    fn from(v: Value) -> Self {
        match v {
            Value::String(s) => Prop::Str(Cow::Owned(s)),
            Value::Undefined => Prop::Undefined,
            _ => Prop::NotString,
        }
    }
}

/// Why a condition does not compile. `position` is the byte offset in the condition text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("at position {position}: {message}")]
pub struct ConditionError {
    pub position: usize,
    pub message: String,
}

impl ConditionError {
    fn new(position: usize, message: impl Into<String>) -> Self {
        ConditionError {
            position,
            message: message.into(),
        }
    }
}

/// A compiled route condition.
#[derive(Clone)]
pub struct Condition {
    text: String,
    root: Expr,
    reads: Reads,
    uses_body: bool,
    uses_twin_change: bool,
}

impl Condition {
    /// Compiles a condition. An empty condition is an error: in a route, `WHERE` must be
    /// followed by an expression.
    pub fn parse(text: &str) -> Result<Condition, ConditionError> {
        let tokens = lex(text)?;
        let ast = Parser::new(text, tokens).parse_condition()?;
        let mut compiler = Compiler::default();
        let (root, _) = compiler.compile(&ast)?;
        Ok(Condition {
            text: text.to_owned(),
            root,
            reads: Reads::new(compiler.lookups, Vec::new()),
            uses_body: compiler.uses_body,
            uses_twin_change: compiler.uses_twin_change,
        })
    }

    /// Full three-valued result: the value of the whole expression (a string condition yields
    /// a string, and so on). A `NaN` number is reported as `Undefined`.
    pub fn evaluate(&self, msg: &dyn MessageView) -> Value {
        eval(&self.root, &Slots::new(&self.reads, msg)).into_public()
    }

    /// True only when the result is Bool(true).
    pub fn matches(&self, msg: &dyn MessageView) -> bool {
        let slots = Slots::new(&self.reads, msg);
        matches!(eval(&self.root, &slots), V::Bool(true))
    }

    /// Whether the condition reads the body ($body...), so callers can skip parsing JSON otherwise.
    pub fn uses_body(&self) -> bool {
        self.uses_body
    }

    /// Whether the condition calls `twin_change_includes`. edgeHub rejects that function
    /// ("Invalid built-in function") unless the route's source is `/twinChangeNotifications`;
    /// this module does not know the source, so the route compiler must check.
    pub fn uses_twin_change(&self) -> bool {
        self.uses_twin_change
    }

    /// The condition as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Debug for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Condition").field(&self.text).finish()
    }
}

/// Many conditions evaluated against the same messages (a router's routes), sharing work:
///
/// * every distinct property reference and body path among them is a lookup, made at most
///   once per message however many conditions read it;
/// * a boolean or number subexpression that occurs in several places (`$connectionModuleId =
///   'sensor'` in many routes) is evaluated at most once per message.
///
/// Both happen lazily, when a condition first needs the value, so `AND`/`OR` still skip
/// what they do not need. Evaluation is pure, which is what makes reusing a value safe.
/// Lookups are shared on what [`MessageView`] asks of implementations: property names are
/// looked up ignoring ASCII case, so `alert` and `ALERT` share one.
#[derive(Clone, Default)]
pub struct ConditionSet {
    /// The lookups of all the conditions, and the repeated subexpressions (only boolean and
    /// number valued ones, see [`Expr::shareable`]).
    reads: Reads,
    roots: Vec<Expr>,
}

impl ConditionSet {
    /// The set of `conditions`; condition `i` of the list is evaluated as number `i`.
    pub fn new(conditions: &[&Condition]) -> Self {
        let mut lookups = Vec::new();
        let roots: Vec<Expr> = conditions
            .iter()
            .map(|c| {
                let moved: Vec<usize> = c
                    .reads
                    .lookups
                    .iter()
                    .map(|l| intern(&mut lookups, l))
                    .collect();
                let mut root = c.root.clone();
                root.renumber(&moved);
                root
            })
            .collect();
        // How many places evaluate each subexpression once shared ones are shared: the
        // inside of a repeated subexpression is counted once, as it will be evaluated once.
        let mut uses: HashMap<String, usize> = HashMap::new();
        for root in &roots {
            count_uses(root, &mut uses);
        }
        let mut sharing = Sharing {
            uses,
            slots: HashMap::new(),
            shared: Vec::new(),
        };
        let roots = roots.into_iter().map(|root| sharing.share(root)).collect();
        ConditionSet {
            reads: Reads::new(lookups, sharing.shared),
            roots,
        }
    }

    /// How many distinct lookups the conditions make.
    pub fn lookups(&self) -> usize {
        self.reads.lookups.len()
    }

    /// How many subexpressions the conditions share.
    pub fn shared(&self) -> usize {
        self.reads.shared.len()
    }

    /// Empty slots for one message, filled as conditions read them.
    pub fn slots<'m>(&'m self, msg: &'m dyn MessageView) -> Slots<'m> {
        Slots::new(&self.reads, msg)
    }

    /// Whether condition `i` is true for the message of `slots` (from this set's
    /// [`ConditionSet::slots`]).
    pub fn matches(&self, i: usize, slots: &Slots<'_>) -> bool {
        debug_assert!(
            std::ptr::eq(slots.reads, &self.reads),
            "slots of another set"
        );
        self.roots
            .get(i)
            .is_some_and(|root| matches!(operand(root, slots), V::Bool(true)))
    }

    /// The full three-valued result of condition `i`, as [`Condition::evaluate`] gives it.
    pub fn evaluate(&self, i: usize, slots: &Slots<'_>) -> Value {
        debug_assert!(
            std::ptr::eq(slots.reads, &self.reads),
            "slots of another set"
        );
        self.roots
            .get(i)
            .map_or(Value::Undefined, |root| eval(root, slots).into_public())
    }
}

/// Replaces repeated subexpressions by shared slots.
struct Sharing {
    /// Uses of each shareable subexpression, by [`Expr::key`].
    uses: HashMap<String, usize>,
    /// The slot of each shared subexpression, by key.
    slots: HashMap<String, usize>,
    shared: Vec<Expr>,
}

impl Sharing {
    /// `e` with every subexpression used in more than one place replaced by its slot.
    fn share(&mut self, mut e: Expr) -> Expr {
        let key = e.shareable().then(|| e.key());
        e.children_mut(&mut |child| {
            let taken = std::mem::replace(child, Expr::Undef);
            *child = self.share(taken);
        });
        let Some(key) = key.filter(|k| self.uses.get(k).is_some_and(|&n| n > 1)) else {
            return e;
        };
        let shared = &mut self.shared;
        let slot = *self.slots.entry(key).or_insert_with(|| {
            shared.push(e);
            shared.len() - 1
        });
        Expr::Shared(slot)
    }
}

fn count_uses(e: &Expr, uses: &mut HashMap<String, usize>) {
    if e.shareable() {
        let n = uses.entry(e.key()).or_default();
        *n += 1;
        if *n > 1 {
            return;
        }
    }
    e.children(&mut |child| count_uses(child, uses));
}

/// What a condition, or a [`ConditionSet`], reads from a message and what it shares; the
/// expressions refer to these by slot.
#[derive(Clone, Default)]
struct Reads {
    lookups: Vec<Lookup>,
    /// Subexpressions used in several places (only in a [`ConditionSet`]).
    shared: Vec<Expr>,
    /// The plain `$body` paths among `lookups`.
    body: BodyPaths,
}

impl Reads {
    fn new(lookups: Vec<Lookup>, shared: Vec<Expr>) -> Self {
        let body = BodyPaths::new(&lookups);
        Reads {
            lookups,
            shared,
            body,
        }
    }
}

/// The slot of `lookup` in `lookups`, added when no equivalent one is there yet.
fn intern(lookups: &mut Vec<Lookup>, lookup: &Lookup) -> usize {
    match lookups.iter().position(|l| l.same_as(lookup)) {
        Some(i) => i,
        None => {
            lookups.push(lookup.clone());
            lookups.len() - 1
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Lexer: GrammarLexer.g4 as ANTLR runs it.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum Tok {
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
struct Token {
    tok: Tok,
    start: usize,
    end: usize,
}

/// What may follow `$` (GrammarLexer `QUERY_PATH_CHARS`).
fn is_query_path_char(c: char) -> bool {
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
fn is_id_char(c: char) -> bool {
    is_query_path_char(c) && c != '[' && c != ']'
}

fn is_ws(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\n')
}

/// Byte length of the longest prefix of `s` whose characters satisfy `pred`.
fn run_len(s: &str, pred: impl Fn(char) -> bool) -> usize {
    s.char_indices()
        .find(|&(_, c)| !pred(c))
        .map_or(s.len(), |(i, _)| i)
}

fn digits_len(b: &[u8]) -> usize {
    b.iter().take_while(|c| c.is_ascii_digit()).count()
}

fn tail(b: &[u8], from: usize) -> &[u8] {
    b.get(from..).unwrap_or(&[])
}

/// `[eE] [+-]? [0-9]+`
fn exp_len(b: &[u8]) -> usize {
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
fn int_len(b: &[u8]) -> usize {
    let sign = usize::from(b.first() == Some(&b'-'));
    let d = digits_len(tail(b, sign));
    if d == 0 {
        0
    } else {
        sign + d
    }
}

/// `HEX_INTEGER_LITERAL: '0' [Xx] HEX_DIGIT+`
fn hex_len(b: &[u8]) -> usize {
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
fn real_len(b: &[u8]) -> usize {
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
fn hex_value(digits: &str) -> Option<f64> {
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
fn scan_string(rest: &str) -> Result<usize, usize> {
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
fn unescape(raw: &str) -> String {
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

enum Cand {
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
fn next_token(rest: &str) -> Result<(usize, Tok), String> {
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

fn lex(src: &str) -> Result<Vec<Token>, ConditionError> {
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

fn describe(tok: &Token, src: &str) -> String {
    format!("'{}'", src.get(tok.start..tok.end).unwrap_or("?"))
}

// ---------------------------------------------------------------------------------------------
// Parser: Condition.g4's `expr`, with ANTLR's precedence for its left-recursive alternatives.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BinOp {
    Mul,
    Div,
    Mod,
    Add,
    Sub,
    Concat,
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
    And,
    Or,
    Coalesce,
}

impl BinOp {
    /// Alternatives listed earlier in Condition.g4 bind tighter; all are left-associative.
    fn precedence(self) -> u8 {
        match self {
            BinOp::Mul | BinOp::Div | BinOp::Mod => 7,
            BinOp::Add | BinOp::Sub | BinOp::Concat => 6,
            BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge => 5,
            BinOp::Eq | BinOp::Ne => 4,
            BinOp::And => 3,
            BinOp::Or => 2,
            BinOp::Coalesce => 1,
        }
    }

    fn from_tok(tok: &Tok) -> Option<BinOp> {
        Some(match tok {
            Tok::Star => BinOp::Mul,
            Tok::Slash => BinOp::Div,
            Tok::Percent => BinOp::Mod,
            Tok::Plus => BinOp::Add,
            Tok::Minus => BinOp::Sub,
            Tok::Concat => BinOp::Concat,
            Tok::Lt => BinOp::Lt,
            Tok::Le => BinOp::Le,
            Tok::Gt => BinOp::Gt,
            Tok::Ge => BinOp::Ge,
            Tok::Eq => BinOp::Eq,
            Tok::Ne => BinOp::Ne,
            Tok::And => BinOp::And,
            Tok::Or => BinOp::Or,
            Tok::Coalesce => BinOp::Coalesce,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UnOp {
    Neg,
    Not,
}

#[derive(Debug)]
struct Ast {
    kind: AstKind,
    /// Byte offset of the token errors about this node point at (operator, function name…).
    pos: usize,
    /// The operator as written, for messages.
    op_text: String,
    depth: usize,
}

#[derive(Debug)]
enum AstKind {
    Bool(bool),
    Str(String),
    Num(Option<f64>),
    Null,
    Undefined,
    Prop(String),
    SysProp {
        name: String,
        escaped: bool,
    },
    Call {
        name: String,
        args: Vec<Ast>,
        /// The argument list's tokens without whitespace (ANTLR `GetText()`), which is what
        /// twin_change_includes takes as its path.
        raw_args: String,
    },
    Unary(UnOp, Box<Ast>),
    Binary(BinOp, Box<Ast>, Box<Ast>),
}

impl Ast {
    fn leaf(kind: AstKind, pos: usize) -> Ast {
        Ast {
            kind,
            pos,
            op_text: String::new(),
            depth: 1,
        }
    }

    fn node(kind: AstKind, pos: usize, op_text: &str, child_depth: usize) -> PResult<Ast> {
        let depth = child_depth + 1;
        if depth > MAX_DEPTH {
            return Err(ConditionError::new(
                pos,
                format!("the condition is too complex (more than {MAX_DEPTH} levels)"),
            ));
        }
        Ok(Ast {
            kind,
            pos,
            op_text: op_text.to_owned(),
            depth,
        })
    }
}

type PResult<T> = Result<T, ConditionError>;

struct Parser<'s> {
    src: &'s str,
    toks: Vec<Token>,
    next: usize,
    nesting: usize,
}

impl<'s> Parser<'s> {
    fn new(src: &'s str, toks: Vec<Token>) -> Self {
        Parser {
            src,
            toks,
            next: 0,
            nesting: 0,
        }
    }

    fn peek(&self) -> Option<&Token> {
        self.toks.get(self.next)
    }

    fn bump(&mut self) -> Option<Token> {
        let t = self.toks.get(self.next).cloned();
        if t.is_some() {
            self.next += 1;
        }
        t
    }

    fn peek_is(&self, tok: &Tok) -> bool {
        self.peek().is_some_and(|t| &t.tok == tok)
    }

    /// Consumes the next token if it is `tok`.
    fn eat(&mut self, tok: &Tok) -> bool {
        let found = self.peek_is(tok);
        if found {
            self.next += 1;
        }
        found
    }

    fn text(&self, t: &Token) -> &'s str {
        self.src.get(t.start..t.end).unwrap_or("")
    }

    fn enter(&mut self, pos: usize) -> PResult<()> {
        self.nesting += 1;
        if self.nesting > MAX_NESTING {
            return Err(ConditionError::new(
                pos,
                format!("nesting deeper than {MAX_NESTING} levels"),
            ));
        }
        Ok(())
    }

    fn leave(&mut self) {
        self.nesting = self.nesting.saturating_sub(1);
    }

    /// The whole text must be one expression. Condition.g4's `condition` rule has no EOF, but
    /// in a route the condition must be followed by INTO, so trailing tokens fail there.
    fn parse_condition(mut self) -> PResult<Ast> {
        if self.toks.is_empty() {
            return Err(ConditionError::new(0, "empty condition"));
        }
        let ast = self.expr(1)?;
        if let Some(t) = self.peek() {
            let message = if t.tok == Tok::RParen {
                "syntax error: unmatched closing ')'".to_owned()
            } else {
                format!(
                    "syntax error: unexpected {} after a complete expression",
                    describe(t, self.src)
                )
            };
            return Err(ConditionError::new(t.start, message));
        }
        Ok(ast)
    }

    fn expr(&mut self, min_prec: u8) -> PResult<Ast> {
        let mut lhs = self.unary()?;
        while let Some(t) = self.peek() {
            let Some(op) = BinOp::from_tok(&t.tok) else {
                break;
            };
            if op.precedence() < min_prec {
                break;
            }
            let (pos, op_text) = (t.start, self.text(t));
            self.next += 1;
            let rhs = self.expr(op.precedence() + 1)?;
            let depth = lhs.depth.max(rhs.depth);
            lhs = Ast::node(
                AstKind::Binary(op, Box::new(lhs), Box::new(rhs)),
                pos,
                op_text,
                depth,
            )?;
        }
        Ok(lhs)
    }

    /// Prefix `-` and `NOT` bind tighter than every binary operator: `NOT a = b` is
    /// `(NOT a) = b`, as in edgeHub.
    fn unary(&mut self) -> PResult<Ast> {
        let op = match self.peek().map(|t| &t.tok) {
            Some(Tok::Minus) => UnOp::Neg,
            Some(Tok::Not) => UnOp::Not,
            _ => return self.primary(),
        };
        let Some(t) = self.bump() else {
            return self.primary();
        };
        self.enter(t.start)?;
        let operand = self.unary()?;
        self.leave();
        let depth = operand.depth;
        Ast::node(
            AstKind::Unary(op, Box::new(operand)),
            t.start,
            self.text(&t),
            depth,
        )
    }

    fn primary(&mut self) -> PResult<Ast> {
        let Some(t) = self.bump() else {
            return Err(ConditionError::new(
                self.src.len(),
                "syntax error: the condition ends where an expression is expected",
            ));
        };
        let leaf = |kind| Ok(Ast::leaf(kind, t.start));
        match t.tok {
            Tok::LParen => {
                self.enter(t.start)?;
                let inner = self.expr(1)?;
                if !self.eat(&Tok::RParen) {
                    return Err(ConditionError::new(
                        t.start,
                        "syntax error: missing closing ')'",
                    ));
                }
                self.leave();
                Ok(inner)
            }
            Tok::Str(ref s) => leaf(AstKind::Str(s.clone())),
            Tok::Num(v) => leaf(AstKind::Num(v)),
            Tok::True => leaf(AstKind::Bool(true)),
            Tok::False => leaf(AstKind::Bool(false)),
            Tok::Null => leaf(AstKind::Null),
            Tok::Undefined => leaf(AstKind::Undefined),
            Tok::SysProp(ref name) => leaf(AstKind::SysProp {
                name: name.clone(),
                escaped: false,
            }),
            Tok::Id(ref name) => {
                if self.peek_is(&Tok::LParen) {
                    self.call(name.clone(), t.start)
                } else {
                    leaf(AstKind::Prop(name.clone()))
                }
            }
            Tok::LBrace => {
                let Some(Token {
                    tok: Tok::SysProp(name),
                    start,
                    ..
                }) = self.bump()
                else {
                    return Err(ConditionError::new(
                        t.start,
                        "syntax error: '{' must be followed by a $property",
                    ));
                };
                if !self.eat(&Tok::RBrace) {
                    return Err(ConditionError::new(
                        t.start,
                        "syntax error: missing closing '}'",
                    ));
                }
                Ok(Ast::leaf(
                    AstKind::SysProp {
                        name,
                        escaped: true,
                    },
                    start,
                ))
            }
            _ => Err(ConditionError::new(
                t.start,
                format!(
                    "syntax error: unexpected {}; expected an expression",
                    describe(&t, self.src)
                ),
            )),
        }
    }

    /// `func=ID '(' exprList? ')'`; the `(` is next.
    fn call(&mut self, name: String, pos: usize) -> PResult<Ast> {
        self.next += 1;
        self.enter(pos)?;
        let first = self.next;
        let mut args = Vec::new();
        if !self.peek_is(&Tok::RParen) {
            loop {
                args.push(self.expr(1)?);
                if !self.eat(&Tok::Comma) {
                    break;
                }
            }
        }
        let last = self.next;
        if !self.eat(&Tok::RParen) {
            return Err(ConditionError::new(
                pos,
                format!("syntax error: missing closing ')' in the call of '{name}'"),
            ));
        }
        self.leave();
        let raw_args = if name.eq_ignore_ascii_case(TWIN_CHANGE_INCLUDES) {
            self.toks
                .get(first..last)
                .unwrap_or(&[])
                .iter()
                .map(|t| self.text(t))
                .collect()
        } else {
            String::new()
        };
        let depth = args.iter().map(|a| a.depth).max().unwrap_or(0);
        Ast::node(
            AstKind::Call {
                name,
                args,
                raw_args,
            },
            pos,
            "",
            depth,
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Compiler: ConditionVisitor's type rules.
// ---------------------------------------------------------------------------------------------

/// Static types of edgeHub's expression tree: `string`, `double`, `Bool`, `Null`,
/// `Undefined` and `QueryValue` (a body query, typed per message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ty {
    Str,
    Num,
    Bool,
    Null,
    Undef,
    Query,
}

impl Ty {
    fn name(self) -> &'static str {
        match self {
            Ty::Str => "string",
            Ty::Num => "number",
            Ty::Bool => "bool",
            Ty::Null => "null",
            Ty::Undef => "undefined",
            Ty::Query => "$body query",
        }
    }

    /// `QueryValue.IsSupportedType`: the types a body query can be compared with.
    fn is_plain(self) -> bool {
        matches!(self, Ty::Str | Ty::Num | Ty::Bool | Ty::Null)
    }

    /// `Args.Match` with QueryValue support: a body query fits any plain parameter type.
    fn fits(self, want: Ty) -> bool {
        self == want || self == Ty::Query
    }
}

/// `CheckOperands(op, left.Type, …)` for comparisons and `??`: same types, or a body query
/// against a plain type.
fn compatible(a: Ty, b: Ty) -> bool {
    a == b || (b == Ty::Query && a.is_plain()) || (a == Ty::Query && b.is_plain())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arith {
    Add,
    Sub,
    Mul,
    Div,
    Mod,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Cmp {
    fn holds(self, o: Ordering) -> bool {
        match self {
            Cmp::Eq => o == Ordering::Equal,
            Cmp::Ne => o != Ordering::Equal,
            Cmp::Lt => o == Ordering::Less,
            Cmp::Le => o != Ordering::Greater,
            Cmp::Gt => o == Ordering::Greater,
            Cmp::Ge => o != Ordering::Less,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Math {
    Abs,
    Exp,
    Ceiling,
    Floor,
    Sign,
    Sqrt,
    Square,
}

/// Built-in functions after overload resolution; overloads edgeHub compiles to a constant
/// (`is_bool(3)` is false) are folded away by the compiler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Func {
    Math(Math),
    Power,
    AsNumber,
    IsBool,
    IsDefined,
    IsNullString,
    IsNullQuery,
    IsNumber,
    IsString,
    Concat,
    Length,
    Lower,
    Upper,
    Substring,
    SubstringLength,
    IndexOf,
    StartsWith,
    EndsWith,
    Contains,
}

impl Func {
    fn gives_string(self) -> bool {
        matches!(
            self,
            Func::Concat | Func::Lower | Func::Upper | Func::Substring | Func::SubstringLength
        )
    }
}

const TWIN_CHANGE_INCLUDES: &str = "twin_change_includes";

/// One step of a body path, as Newtonsoft's `SelectTokens` runs it.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    Field(String),
    AnyField,
    Index(i64),
    AnyIndex,
}

#[derive(Debug, Clone, PartialEq)]
struct JsonPath {
    /// None when Newtonsoft would throw while parsing the path at run time, which edgeHub
    /// catches and turns into undefined.
    steps: Option<Vec<Step>>,
}

/// What a condition reads from a message. Each distinct lookup has a slot (an index into the
/// condition's or the [`ConditionSet`]'s lookups) and is made at most once per message.
#[derive(Debug, Clone)]
enum Lookup {
    /// An application property: a string, a null string or undefined.
    App(String),
    /// A system property, by edgeHub's name without `$`.
    System(String),
    /// A `$body` query (BodyQuery.Runtime).
    Body(JsonPath),
    /// `twin_change_includes(path)`: a boolean or undefined.
    TwinIncludes(JsonPath),
}

impl Lookup {
    /// Whether both always read the same value: names compare ignoring ASCII case, as the
    /// message's property maps do; paths compare step by step (JSON names are case-sensitive).
    fn same_as(&self, other: &Lookup) -> bool {
        match (self, other) {
            (Lookup::App(a), Lookup::App(b)) | (Lookup::System(a), Lookup::System(b)) => {
                a.eq_ignore_ascii_case(b)
            }
            (Lookup::Body(a), Lookup::Body(b))
            | (Lookup::TwinIncludes(a), Lookup::TwinIncludes(b)) => a == b,
            _ => false,
        }
    }

    fn read<'m>(&self, msg: &'m dyn MessageView) -> V<'m> {
        match self {
            Lookup::App(name) => property(msg.app_property_ref(name)),
            Lookup::System(name) => property(msg.system_property_ref(name)),
            Lookup::Body(path) => body_query(path, msg),
            Lookup::TwinIncludes(path) => twin_change_includes(path, msg),
        }
    }
}

// A plain tag (no niche in the `String`s) makes the evaluator's match on every node cheaper.
#[derive(Debug, Clone)]
#[repr(u8)]
enum Expr {
    Undef,
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    /// A lookup's value, by slot.
    Lookup(usize),
    /// A subexpression of a [`ConditionSet`] that occurs in several places, by slot.
    Shared(usize),
    /// `$name` and `$body.x`: the application property of that name (slot `app`) if it is
    /// defined, else the system property `name` or the body query (slot `or`).
    AppOr {
        app: usize,
        or: usize,
    },
    Neg(Box<Expr>),
    Not(Box<Expr>),
    Arith {
        op: Arith,
        /// Body-query arithmetic keeps NaN as a (defined) number, like QueryValue does.
        query: bool,
        l: Box<Expr>,
        r: Box<Expr>,
    },
    Cmp {
        op: Cmp,
        /// The operands' static type, or `Query` when either is a body query.
        kind: Ty,
        l: Box<Expr>,
        r: Box<Expr>,
    },
    Logic {
        and: bool,
        /// Kleene logic for `Bool`/`Undefined` operands; with a body query both sides must be
        /// booleans at run time, else the result is undefined (QueryValue's `&` and `|`).
        kleene: bool,
        l: Box<Expr>,
        r: Box<Expr>,
    },
    /// `subject = 'literal'` (`equal`) or `subject <> 'literal'`, with `query` when the
    /// subject is a body query: what [`Expr::Cmp`] would give, without its generality.
    StrEq {
        subject: Box<Expr>,
        literal: String,
        equal: bool,
        query: bool,
    },
    Coalesce(Box<Expr>, Box<Expr>),
    Call(Func, Vec<Expr>),
}

impl Expr {
    fn children(&self, f: &mut impl FnMut(&Expr)) {
        match self {
            Expr::Undef
            | Expr::Null
            | Expr::Bool(_)
            | Expr::Num(_)
            | Expr::Str(_)
            | Expr::Lookup(_)
            | Expr::Shared(_)
            | Expr::AppOr { .. } => {}
            Expr::Neg(x) | Expr::Not(x) | Expr::StrEq { subject: x, .. } => f(x),
            Expr::Arith { l, r, .. }
            | Expr::Cmp { l, r, .. }
            | Expr::Logic { l, r, .. }
            | Expr::Coalesce(l, r) => {
                f(l);
                f(r);
            }
            Expr::Call(_, args) => args.iter().for_each(f),
        }
    }

    fn children_mut(&mut self, f: &mut impl FnMut(&mut Expr)) {
        match self {
            Expr::Undef
            | Expr::Null
            | Expr::Bool(_)
            | Expr::Num(_)
            | Expr::Str(_)
            | Expr::Lookup(_)
            | Expr::Shared(_)
            | Expr::AppOr { .. } => {}
            Expr::Neg(x) | Expr::Not(x) | Expr::StrEq { subject: x, .. } => f(x),
            Expr::Arith { l, r, .. }
            | Expr::Cmp { l, r, .. }
            | Expr::Logic { l, r, .. }
            | Expr::Coalesce(l, r) => {
                f(l);
                f(r);
            }
            Expr::Call(_, args) => args.iter_mut().for_each(f),
        }
    }

    /// Moves every lookup slot `i` to `slots[i]` (when the condition joins a
    /// [`ConditionSet`]).
    fn renumber(&mut self, slots: &[usize]) {
        let moved = |i: &mut usize| *i = slots.get(*i).copied().unwrap_or(*i);
        match self {
            Expr::Lookup(i) => moved(i),
            Expr::AppOr { app, or } => {
                moved(app);
                moved(or);
            }
            _ => self.children_mut(&mut |child| child.renumber(slots)),
        }
    }

    /// Whether a [`ConditionSet`] may keep this expression's value for reuse: it reads the
    /// message (constants cost nothing to evaluate) and its value is a boolean, a number or
    /// undefined, never a string, so that keeping it borrows nothing.
    fn shareable(&self) -> bool {
        let scalar = match self {
            Expr::Neg(_)
            | Expr::Not(_)
            | Expr::Arith { .. }
            | Expr::Cmp { .. }
            | Expr::StrEq { .. }
            | Expr::Logic { .. } => true,
            Expr::Call(f, _) => !f.gives_string(),
            _ => false,
        };
        scalar && self.reads_message()
    }

    fn reads_message(&self) -> bool {
        let mut reads = matches!(self, Expr::Lookup(_) | Expr::Shared(_) | Expr::AppOr { .. });
        self.children(&mut |child| reads |= child.reads_message());
        reads
    }

    /// Equal keys for equal expressions: the derived `Debug` text names every field, and
    /// prints each number with the digits that read back as exactly it (`-0.0` too).
    fn key(&self) -> String {
        format!("{self:?}")
    }
}

#[derive(Default)]
struct Compiler {
    lookups: Vec<Lookup>,
    uses_body: bool,
    uses_twin_change: bool,
}

fn operand_error(ast: &Ast, tys: &[Ty]) -> ConditionError {
    let arity = if tys.len() == 1 { "unary" } else { "binary" };
    let have = tys
        .iter()
        .map(|t| format!("'{}'", t.name()))
        .collect::<Vec<_>>()
        .join(" and ");
    ConditionError::new(
        ast.pos,
        format!(
            "invalid operands to {arity} operator '{}': have {have}",
            ast.op_text
        ),
    )
}

impl Compiler {
    fn slot(&mut self, lookup: Lookup) -> usize {
        intern(&mut self.lookups, &lookup)
    }

    fn compile(&mut self, ast: &Ast) -> PResult<(Expr, Ty)> {
        Ok(match &ast.kind {
            AstKind::Bool(b) => (Expr::Bool(*b), Ty::Bool),
            AstKind::Str(s) => (Expr::Str(s.clone()), Ty::Str),
            AstKind::Num(Some(v)) => (Expr::Num(*v), Ty::Num),
            AstKind::Num(None) | AstKind::Undefined => (Expr::Undef, Ty::Undef),
            AstKind::Null => (Expr::Null, Ty::Null),
            AstKind::Prop(name) => (Expr::Lookup(self.slot(Lookup::App(name.clone()))), Ty::Str),
            AstKind::SysProp { name, escaped } => self.sys_prop(name, *escaped, ast.pos)?,
            AstKind::Call {
                name,
                args,
                raw_args,
            } => self.call(name, args, raw_args, ast.pos)?,
            AstKind::Unary(op, operand) => self.unary(ast, *op, operand)?,
            AstKind::Binary(op, l, r) => self.binary(ast, *op, l, r)?,
        })
    }

    /// VisitSysProperty / VisitSysPropertyEscaped.
    fn sys_prop(&mut self, name: &str, escaped: bool, pos: usize) -> PResult<(Expr, Ty)> {
        let bare = name.get(1..).unwrap_or("");
        let body = match strip_prefix_ignore_ascii_case(name, "$body.") {
            Some(query) => {
                self.uses_body = true;
                Some(json_path(query, pos, false)?)
            }
            None => None,
        };
        let has_brackets = name.contains('[') || name.contains(']');
        let app_or = |c: &mut Self, or: usize| Expr::AppOr {
            app: c.slot(Lookup::App(name.to_owned())),
            or,
        };
        Ok(match (body, escaped) {
            // `{$body.x}` and bracketed `$body.x[0]` skip the application-property lookup.
            (Some(path), true) => (Expr::Lookup(self.slot(Lookup::Body(path))), Ty::Query),
            (Some(path), false) if has_brackets => {
                (Expr::Lookup(self.slot(Lookup::Body(path))), Ty::Query)
            }
            (Some(path), false) => {
                let body = self.slot(Lookup::Body(path));
                (app_or(self, body), Ty::Query)
            }
            // Property names cannot contain brackets: edgeHub compiles `$x[0]` to undefined.
            (None, _) if has_brackets => (Expr::Undef, Ty::Undef),
            (None, true) => (
                Expr::Lookup(self.slot(Lookup::System(bare.to_owned()))),
                Ty::Str,
            ),
            (None, false) => {
                let system = self.slot(Lookup::System(bare.to_owned()));
                (app_or(self, system), Ty::Str)
            }
        })
    }

    fn unary(&mut self, ast: &Ast, op: UnOp, operand: &Ast) -> PResult<(Expr, Ty)> {
        let (e, t) = self.compile(operand)?;
        match (op, t) {
            (UnOp::Neg, Ty::Num) => Ok((Expr::Neg(Box::new(e)), Ty::Num)),
            // QueryValue defines no unary minus, so .NET's Expression.Negate throws and the
            // route does not compile.
            (UnOp::Neg, Ty::Query) => Err(ConditionError::new(
                ast.pos,
                "unary operator '-' is not defined for a $body query",
            )),
            // `NOT null` is true.
            (UnOp::Not, Ty::Null) => Ok((Expr::Bool(true), Ty::Bool)),
            (UnOp::Not, Ty::Bool | Ty::Query) => Ok((Expr::Not(Box::new(e)), Ty::Bool)),
            _ => Err(operand_error(ast, &[t])),
        }
    }

    fn binary(&mut self, ast: &Ast, op: BinOp, l: &Ast, r: &Ast) -> PResult<(Expr, Ty)> {
        let (le, lt) = self.compile(l)?;
        let (re, rt) = self.compile(r)?;
        let query = lt == Ty::Query || rt == Ty::Query;
        let (l, r) = (Box::new(le), Box::new(re));
        let arith = match op {
            BinOp::Add => Some(Arith::Add),
            BinOp::Sub => Some(Arith::Sub),
            BinOp::Mul => Some(Arith::Mul),
            BinOp::Div => Some(Arith::Div),
            BinOp::Mod => Some(Arith::Mod),
            _ => None,
        };
        if let Some(arith) = arith {
            if !(lt.fits(Ty::Num) && rt.fits(Ty::Num)) {
                return Err(operand_error(ast, &[lt, rt]));
            }
            // QueryValue has no `%` operator: Expression.Modulo throws in edgeHub.
            if query && arith == Arith::Mod {
                return Err(ConditionError::new(
                    ast.pos,
                    "operator '%' is not defined for a $body query",
                ));
            }
            let ty = if query { Ty::Query } else { Ty::Num };
            return Ok((
                Expr::Arith {
                    op: arith,
                    query,
                    l,
                    r,
                },
                ty,
            ));
        }
        let cmp = match op {
            BinOp::Eq => Some(Cmp::Eq),
            BinOp::Ne => Some(Cmp::Ne),
            BinOp::Lt => Some(Cmp::Lt),
            BinOp::Le => Some(Cmp::Le),
            BinOp::Gt => Some(Cmp::Gt),
            BinOp::Ge => Some(Cmp::Ge),
            _ => None,
        };
        if let Some(cmp) = cmp {
            if !compatible(lt, rt) {
                return Err(operand_error(ast, &[lt, rt]));
            }
            let kind = if query { Ty::Query } else { lt };
            // The commonest test in routes, `name = 'literal'`, gets a node of its own. Both
            // `=` and `<>` are symmetric, so the literal may be on either side.
            if let (Cmp::Eq | Cmp::Ne, Ty::Str | Ty::Query) = (cmp, kind) {
                let (subject, literal) = match (*l, *r) {
                    (subject, Expr::Str(literal)) | (Expr::Str(literal), subject) => {
                        (subject, literal)
                    }
                    (l, r) => {
                        let e = Expr::Cmp {
                            op: cmp,
                            kind,
                            l: Box::new(l),
                            r: Box::new(r),
                        };
                        return Ok((e, Ty::Bool));
                    }
                };
                let e = Expr::StrEq {
                    subject: Box::new(subject),
                    literal,
                    equal: cmp == Cmp::Eq,
                    query,
                };
                return Ok((e, Ty::Bool));
            }
            return Ok((
                Expr::Cmp {
                    op: cmp,
                    kind,
                    l,
                    r,
                },
                Ty::Bool,
            ));
        }
        match op {
            BinOp::Concat => {
                if !(lt.fits(Ty::Str) && rt.fits(Ty::Str)) {
                    return Err(operand_error(ast, &[lt, rt]));
                }
                Ok((Expr::Call(Func::Concat, vec![*l, *r]), Ty::Str))
            }
            BinOp::Coalesce => {
                if !compatible(lt, rt) {
                    return Err(operand_error(ast, &[lt, rt]));
                }
                if lt == Ty::Undef {
                    // `undefined ?? x` is compiled to `x`.
                    return Ok((*r, rt));
                }
                let ty = if query { Ty::Query } else { lt };
                Ok((Expr::Coalesce(l, r), ty))
            }
            _ => self.logic(ast, op == BinOp::And, (l, lt), (r, rt)),
        }
    }

    /// VisitAnd / VisitOr with CheckBooleanOperands and the `&`/`|` operators of Bool, Null,
    /// Undefined and QueryValue.
    fn logic(
        &mut self,
        ast: &Ast,
        and: bool,
        (l, lt): (Box<Expr>, Ty),
        (r, rt): (Box<Expr>, Ty),
    ) -> PResult<(Expr, Ty)> {
        let left_ok = matches!(lt, Ty::Null | Ty::Bool | Ty::Undef | Ty::Query);
        // edgeHub tests `left.Type == QueryValue` where it means the right operand, so any
        // right operand is accepted after a body query and a body query is rejected on the
        // right of a plain boolean (`true AND $body.flag` does not compile).
        let right_ok = matches!(rt, Ty::Null | Ty::Bool | Ty::Undef) || lt == Ty::Query;
        if !(left_ok && right_ok) {
            return Err(operand_error(ast, &[lt, rt]));
        }
        if lt == Ty::Query || rt == Ty::Query {
            // The result of `AND` with a null operand is typed Null, and a QueryValue cannot be
            // converted to Null: .NET throws while compiling.
            if and && (lt == Ty::Null || rt == Ty::Null) {
                return Err(operand_error(ast, &[lt, rt]));
            }
            return Ok((
                Expr::Logic {
                    and,
                    kleene: false,
                    l,
                    r,
                },
                Ty::Bool,
            ));
        }
        Ok(match (lt, rt) {
            // Neither Null nor Undefined defines `&`/`|` with the other.
            (Ty::Null, Ty::Undef) | (Ty::Undef, Ty::Null) => {
                return Err(operand_error(ast, &[lt, rt]))
            }
            // Null & anything is Null; Null | x is x.
            (Ty::Null, _) | (_, Ty::Null) if and => (Expr::Null, Ty::Null),
            (Ty::Null, Ty::Null) => (Expr::Null, Ty::Null),
            (Ty::Null, _) => (*r, rt),
            (_, Ty::Null) => (*l, lt),
            _ => (
                Expr::Logic {
                    and,
                    kleene: true,
                    l,
                    r,
                },
                Ty::Bool,
            ),
        })
    }

    fn call(&mut self, name: &str, args: &[Ast], raw: &str, pos: usize) -> PResult<(Expr, Ty)> {
        let Some(builtin) = BUILTINS
            .iter()
            .find(|b| b.eq_ignore_ascii_case(name))
            .copied()
        else {
            return Err(ConditionError::new(
                pos,
                format!("invalid built-in function '{name}'"),
            ));
        };
        if builtin == TWIN_CHANGE_INCLUDES {
            // The argument is not an expression: its text is the twin path, and it is never
            // type-checked (edgeHub's builtin is a "body query" builtin).
            if raw.is_empty() {
                return Err(ConditionError::new(
                    pos,
                    "twin_change_includes argument cannot be empty",
                ));
            }
            let path = json_path(raw, pos, true)?;
            self.uses_twin_change = true;
            return Ok((
                Expr::Lookup(self.slot(Lookup::TwinIncludes(path))),
                Ty::Bool,
            ));
        }
        let mut exprs = Vec::with_capacity(args.len());
        let mut tys = Vec::with_capacity(args.len());
        for a in args {
            let (e, t) = self.compile(a)?;
            exprs.push(e);
            tys.push(t);
        }
        use Ty::{Bool, Null, Num, Query, Str, Undef};
        let call = |f: Func, ty: Ty, exprs: Vec<Expr>| Ok((Expr::Call(f, exprs), ty));
        let constant = |b: bool| Ok((Expr::Bool(b), Bool));
        let math = match builtin {
            "abs" => Some(Math::Abs),
            "exp" => Some(Math::Exp),
            "ceiling" => Some(Math::Ceiling),
            "floor" => Some(Math::Floor),
            "sign" => Some(Math::Sign),
            "sqrt" => Some(Math::Sqrt),
            "square" => Some(Math::Square),
            _ => None,
        };
        // The first overload (BuiltinExecutor) whose parameters match wins, as in Builtin.Get.
        match (builtin, tys.as_slice()) {
            (_, [t]) if t.fits(Num) && math.is_some() => {
                let m = math.unwrap_or(Math::Abs);
                call(Func::Math(m), Num, exprs)
            }
            ("power", [a, b]) if a.fits(Num) && b.fits(Num) => call(Func::Power, Num, exprs),
            ("as_number", [t]) if t.fits(Str) => call(Func::AsNumber, Num, exprs),
            // as_number(number) is the number itself.
            ("as_number", [Num]) => Ok((exprs.into_iter().next().unwrap_or(Expr::Undef), Num)),
            ("is_bool", [t]) if t.fits(Bool) => call(Func::IsBool, Bool, exprs),
            ("is_bool", [_]) => constant(false),
            ("is_defined", [Str | Num | Bool | Query]) => call(Func::IsDefined, Bool, exprs),
            ("is_defined", [Undef]) => constant(false),
            ("is_defined", [Null]) => constant(true),
            ("is_null", [Str]) => call(Func::IsNullString, Bool, exprs),
            ("is_null", [Query]) => call(Func::IsNullQuery, Bool, exprs),
            ("is_null", [Null]) => constant(true),
            ("is_null", [_]) => constant(false),
            ("is_number", [t]) if t.fits(Num) => call(Func::IsNumber, Bool, exprs),
            ("is_number", [_]) => constant(false),
            ("is_string", [t]) if t.fits(Str) => call(Func::IsString, Bool, exprs),
            ("is_string", [_]) => constant(false),
            ("concat", ts) if ts.len() >= 2 && ts.iter().all(|t| t.fits(Str)) => {
                call(Func::Concat, Str, exprs)
            }
            ("length", [t]) if t.fits(Str) => call(Func::Length, Num, exprs),
            ("lower", [t]) if t.fits(Str) => call(Func::Lower, Str, exprs),
            ("upper", [t]) if t.fits(Str) => call(Func::Upper, Str, exprs),
            ("substring", [s, a]) if s.fits(Str) && a.fits(Num) => {
                call(Func::Substring, Str, exprs)
            }
            ("substring", [s, a, b]) if s.fits(Str) && a.fits(Num) && b.fits(Num) => {
                call(Func::SubstringLength, Str, exprs)
            }
            ("index_of", [a, b]) if a.fits(Str) && b.fits(Str) => call(Func::IndexOf, Num, exprs),
            ("starts_with", [a, b]) if a.fits(Str) && b.fits(Str) => {
                call(Func::StartsWith, Bool, exprs)
            }
            ("ends_with", [a, b]) if a.fits(Str) && b.fits(Str) => {
                call(Func::EndsWith, Bool, exprs)
            }
            ("contains", [a, b]) if a.fits(Str) && b.fits(Str) => call(Func::Contains, Bool, exprs),
            _ => {
                let given = tys.iter().map(|t| t.name()).collect::<Vec<_>>().join(", ");
                Err(ConditionError::new(
                    pos,
                    format!("invalid arguments to built-in function '{name}': {name}({given})"),
                ))
            }
        }
    }
}

/// ConditionVisitor's built-ins; names compare ignoring case.
const BUILTINS: &[&str] = &[
    "abs",
    "exp",
    "power",
    "square",
    "ceiling",
    "floor",
    "sign",
    "sqrt",
    "as_number",
    "is_bool",
    "is_defined",
    "is_null",
    "is_number",
    "is_string",
    "concat",
    "length",
    "lower",
    "upper",
    "substring",
    "index_of",
    "starts_with",
    "ends_with",
    "contains",
    TWIN_CHANGE_INCLUDES,
];

fn strip_prefix_ignore_ascii_case<'t>(s: &'t str, prefix: &str) -> Option<&'t str> {
    let head = s.as_bytes().get(..prefix.len())?;
    if head.eq_ignore_ascii_case(prefix.as_bytes()) {
        s.get(prefix.len()..)
    } else {
        None
    }
}

// ---------------------------------------------------------------------------------------------
// Body and twin paths: JsonPath.g4 validation at compile time, Newtonsoft at run time.
// ---------------------------------------------------------------------------------------------

/// BodyQuery / TwinChangeIncludes: the path must pass JsonPath.g4 (and, for twins, start
/// with a supported prefix); what it selects is decided by Newtonsoft's path parser.
fn json_path(query: &str, pos: usize, twin: bool) -> PResult<JsonPath> {
    let what = if twin {
        "twin_change_includes argument"
    } else {
        "$body query"
    };
    if query.is_empty() {
        return Err(ConditionError::new(pos, format!("{what} cannot be empty")));
    }
    if let Err(m) = validate_json_path(query) {
        return Err(ConditionError::new(
            pos,
            format!("invalid {what} '{query}': {m}"),
        ));
    }
    const TWIN_PREFIXES: [&str; 3] = ["properties.reported.", "properties.desired.", "tags."];
    if twin
        && !TWIN_PREFIXES
            .iter()
            .any(|p| strip_prefix_ignore_ascii_case(query, p).is_some())
    {
        return Err(ConditionError::new(
            pos,
            format!(
                "'{query}' is not supported; supported prefixes: 'properties.reported.', \
                 'properties.desired.', 'tags.'"
            ),
        ));
    }
    Ok(JsonPath {
        steps: newtonsoft_steps(query),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PathTok {
    Dot,
    Open,
    Close,
    Int,
    Ident,
}

fn is_path_ident_char(c: char) -> bool {
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
            | '['
            | ']'
            | '?'
            | '='
            | '{'
            | '}'
            | '.'
            | '\t'
            | '\n'
            | '\r'
    )
}

/// JsonPath.g4: `expr: innerExpr ('.' innerExpr)*`, `innerExpr: IDENTIFIER ('[' INT ']')?`.
/// The start rule has no EOF, so ANTLR stops at the first token that cannot continue the
/// path and accepts what came before; characters no lexer rule matches are dropped.
fn validate_json_path(q: &str) -> Result<(), &'static str> {
    let mut toks = Vec::new();
    let mut i = 0;
    while let Some(rest) = q.get(i..) {
        let Some(c) = rest.chars().next() else {
            break;
        };
        let fixed = match c {
            '.' => Some(PathTok::Dot),
            '[' => Some(PathTok::Open),
            ']' => Some(PathTok::Close),
            _ => None,
        };
        if let Some(t) = fixed {
            toks.push(t);
            i += 1;
            continue;
        }
        let int = digits_len(rest.as_bytes());
        let ident = run_len(rest, is_path_ident_char);
        let ws = run_len(rest, |c| matches!(c, ' ' | '\t' | '\n' | '\r'));
        if int == 0 && ident == 0 && ws == 0 {
            i += c.len_utf8();
        } else if int >= ident && int >= ws {
            toks.push(PathTok::Int);
            i += int;
        } else if ident >= ws {
            toks.push(PathTok::Ident);
            i += ident;
        } else {
            i += ws;
        }
    }
    let mut it = toks.into_iter().peekable();
    loop {
        if it.next() != Some(PathTok::Ident) {
            return Err("expected a property name");
        }
        if it.peek() == Some(&PathTok::Open) {
            it.next();
            if it.next() != Some(PathTok::Int) {
                return Err("expected an array index");
            }
            if it.next() != Some(PathTok::Close) {
                return Err("expected ']'");
            }
        }
        if it.peek() != Some(&PathTok::Dot) {
            return Ok(());
        }
        it.next();
    }
}

/// Newtonsoft's JPath parser for the forms a condition can produce: dotted names, `*`,
/// `[n]`, `[*]` and a leading `$` (the root). Returns None where Newtonsoft throws, and also
/// for the forms it supports but this module does not (`['name']`, `..name`, slices, lists):
/// those can only appear after a valid prefix as trailing text JsonPath.g4 ignores, and they
/// evaluate to undefined here.
fn newtonsoft_steps(q: &str) -> Option<Vec<Step>> {
    let c: Vec<char> = q.chars().collect();
    let at = |i: usize| c.get(i).copied();
    let member = |from: usize, to: usize| -> Step {
        let name: String = c.get(from..to).unwrap_or(&[]).iter().collect();
        let name = name.trim_end();
        if name == "*" {
            Step::AnyField
        } else {
            Step::Field(name.to_owned())
        }
    };
    let mut steps = Vec::new();
    let mut i = 0;
    let mut part_start = 0;
    while at(i) == Some(' ') {
        i += 1;
    }
    if i == c.len() {
        return Some(steps);
    }
    if at(i) == Some('$') {
        if c.len() == 1 {
            return Some(steps);
        }
        if matches!(at(i + 1), Some('.' | '[')) {
            i += 1;
            part_start = i;
        }
    }
    let mut following_indexer = false;
    let mut following_dot = false;
    let mut ended = false;
    while let Some(ch) = at(i) {
        if ended {
            break;
        }
        match ch {
            '[' | '(' => {
                if i > part_start {
                    steps.push(member(part_start, i));
                }
                if ch == '(' {
                    return None;
                }
                i += 1;
                while at(i) == Some(' ') {
                    i += 1;
                }
                match at(i) {
                    None | Some('\'' | '?') => return None,
                    Some('*') => {
                        i += 1;
                        while at(i) == Some(' ') {
                            i += 1;
                        }
                        if at(i) != Some(']') {
                            return None;
                        }
                        steps.push(Step::AnyIndex);
                    }
                    Some(_) => {
                        let start = i;
                        while matches!(at(i), Some(d) if d.is_ascii_digit() || d == '-') {
                            i += 1;
                        }
                        if at(i) != Some(']') || i == start {
                            return None;
                        }
                        let text: String = c.get(start..i).unwrap_or(&[]).iter().collect();
                        // Convert.ToInt32: anything else throws.
                        let n = text.parse::<i32>().ok()?;
                        steps.push(Step::Index(i64::from(n)));
                    }
                }
                i += 1;
                part_start = i;
                following_indexer = true;
                following_dot = false;
            }
            ']' | ')' | ' ' => ended = true,
            '.' => {
                if i > part_start {
                    steps.push(member(part_start, i));
                }
                if at(i + 1) == Some('.') {
                    return None;
                }
                i += 1;
                part_start = i;
                following_indexer = false;
                following_dot = true;
            }
            _ => {
                if following_indexer {
                    return None;
                }
                i += 1;
            }
        }
    }
    let at_end = i == c.len();
    if i > part_start {
        steps.push(member(part_start, i));
    } else if following_dot && at_end {
        return None;
    }
    if !at_end {
        while at(i) == Some(' ') {
            i += 1;
        }
        if i < c.len() {
            return None;
        }
    }
    Some(steps)
}

enum Selected<'a> {
    Nothing,
    One(&'a serde_json::Value),
    Many,
}

/// `SelectTokens(path)` with errors off; None where Newtonsoft throws (a negative index into
/// an array).
fn select<'a>(root: &'a serde_json::Value, steps: &[Step]) -> Option<Selected<'a>> {
    use serde_json::Value as J;
    let mut current = vec![root];
    for step in steps {
        let mut next = Vec::new();
        for t in current {
            match (step, t) {
                (Step::Field(name), J::Object(m)) => next.extend(m.get(name)),
                (Step::AnyField, J::Object(m)) => next.extend(m.values()),
                (Step::Index(i), J::Array(a)) => {
                    let i = usize::try_from(*i).ok()?;
                    next.extend(a.get(i));
                }
                (Step::AnyIndex, J::Array(a)) => next.extend(a.iter()),
                _ => {}
            }
        }
        current = next;
    }
    Some(match current.as_slice() {
        [] => Selected::Nothing,
        [one] => Selected::One(one),
        _ => Selected::Many,
    })
}

/// BodyQuery.Runtime's value of a selected token: objects, arrays and strings Newtonsoft
/// reads as dates are undefined.
fn token_value(v: &serde_json::Value) -> V<'_> {
    use serde_json::Value as J;
    match v {
        J::Null => V::Null,
        J::Bool(b) => V::Bool(*b),
        J::Number(n) => n.as_f64().map_or(V::Undef, V::Num),
        J::String(s) => token_string(Cow::Borrowed(s)),
        J::Array(_) | J::Object(_) => V::Undef,
    }
}

/// The plain body paths (names and indexes only) among some lookups, merged into a tree so
/// that one pass over a body's JSON text finds all their values ([`BodyPaths::read`]).
/// Paths with `*` or `[*]` can select several values; they read [`MessageView::body_json`].
#[derive(Debug, Clone, Default)]
struct BodyPaths {
    root: PathNode,
    /// The lookup slot of each path, by path number.
    slots: Vec<usize>,
}

#[derive(Debug, Clone, Default)]
struct PathNode {
    /// The number of the path that ends here.
    end: Option<usize>,
    /// Where the paths go on, by name (an object member) or index (an array element).
    next: Vec<(Step, PathNode)>,
}

impl BodyPaths {
    fn new(lookups: &[Lookup]) -> Self {
        let mut paths = BodyPaths::default();
        for (slot, lookup) in lookups.iter().enumerate() {
            let Lookup::Body(JsonPath { steps: Some(steps) }) = lookup else {
                continue;
            };
            if !steps
                .iter()
                .all(|s| matches!(s, Step::Field(_) | Step::Index(_)))
            {
                continue;
            }
            let mut node = &mut paths.root;
            for step in steps {
                node = node.step(step);
            }
            // Lookups are distinct, so no other path ends here.
            node.end = Some(paths.slots.len());
            paths.slots.push(slot);
        }
        paths
    }

    /// The value of every path in the JSON document `text`, by path number: what
    /// `body_query` gives for it with `serde_json::from_str(text)` as the body. The rest of
    /// the document goes through the same parser (so the same texts are rejected) but is not
    /// kept.
    fn read<'t>(&self, text: &'t str) -> Vec<V<'t>> {
        let mut values = vec![V::Missing; self.slots.len()];
        let mut de = serde_json::Deserializer::from_str(text);
        let reader = Reader {
            node: &self.root,
            values: &mut values,
            root: true,
        };
        let read = serde::de::DeserializeSeed::deserialize(reader, &mut de);
        if read.and_then(|()| de.end()).is_err() {
            values.fill(V::Undef);
        }
        values
    }
}

impl PathNode {
    fn step(&mut self, step: &Step) -> &mut PathNode {
        let i = match self.next.iter().position(|(s, _)| s == step) {
            Some(i) => i,
            None => {
                self.next.push((step.clone(), PathNode::default()));
                self.next.len() - 1
            }
        };
        &mut self.next[i].1
    }

    fn member(&self, name: &str) -> Option<&PathNode> {
        self.next
            .iter()
            .find(|(s, _)| matches!(s, Step::Field(n) if n == name))
            .map(|(_, node)| node)
    }

    fn element(&self, index: i64) -> Option<&PathNode> {
        self.next
            .iter()
            .find(|(s, _)| matches!(s, Step::Index(i) if *i == index))
            .map(|(_, node)| node)
    }

    /// Sets the value of every path through this node.
    fn fill(&self, values: &mut [V<'_>], value: &V<'static>) {
        if let Some(v) = self.end.and_then(|k| values.get_mut(k)) {
            *v = value.clone();
        }
        for (_, node) in &self.next {
            node.fill(values, value);
        }
    }
}

/// Reads one JSON value at `node` of a path tree: keeps it when a path ends there and goes
/// into the members and elements that paths go on through. Every path starts as selecting
/// nothing (`Missing`).
struct Reader<'p, 'v, 't> {
    node: &'p PathNode,
    values: &'v mut [V<'t>],
    /// The document itself: any value but an object makes every body query undefined.
    root: bool,
}

impl<'t> Reader<'_, '_, 't> {
    fn found(self, value: impl FnOnce() -> V<'t>) {
        if let Some(v) = self.node.end.and_then(|k| self.values.get_mut(k)) {
            *v = value();
        }
        if self.root {
            self.values.fill(V::Undef);
        }
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for Reader<'_, '_, 'de> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Reader<'_, '_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        self.found(|| V::Null);
        Ok(())
    }

    fn visit_bool<E>(self, b: bool) -> Result<(), E> {
        self.found(|| V::Bool(b));
        Ok(())
    }

    // Numbers as `serde_json::Number::as_f64` reads them.
    fn visit_u64<E>(self, n: u64) -> Result<(), E> {
        self.found(|| V::Num(n as f64));
        Ok(())
    }

    fn visit_i64<E>(self, n: i64) -> Result<(), E> {
        self.found(|| V::Num(n as f64));
        Ok(())
    }

    fn visit_f64<E>(self, x: f64) -> Result<(), E> {
        // serde_json::Value holds a number that is not finite as null.
        self.found(|| if x.is_finite() { V::Num(x) } else { V::Null });
        Ok(())
    }

    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<(), E> {
        self.found(|| token_string(Cow::Borrowed(s)));
        Ok(())
    }

    fn visit_str<E>(self, s: &str) -> Result<(), E> {
        // Only strings with escapes come here, and are copied only when a path ends here.
        self.found(|| token_string(Cow::Owned(s.to_owned())));
        Ok(())
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let (node, values) = (self.node, self.values);
        // Newtonsoft throws on a negative index into an array: those paths are undefined.
        for (step, next) in &node.next {
            if matches!(step, Step::Index(i) if *i < 0) {
                next.fill(values, &V::Undef);
            }
        }
        let mut index = 0;
        loop {
            let more = match node.element(index) {
                Some(next) => seq
                    .next_element_seed(Reader {
                        node: next,
                        values: &mut *values,
                        root: false,
                    })?
                    .is_some(),
                None => seq.next_element::<Skip>()?.is_some(),
            };
            if !more {
                break;
            }
            index += 1;
        }
        Reader {
            node,
            values,
            root: self.root,
        }
        .found(|| V::Undef);
        Ok(())
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let (node, values) = (self.node, self.values);
        while let Some(next) = map.next_key_seed(Member(node))? {
            match next {
                Some(next) => {
                    // A repeated name: its last value is the one kept.
                    next.fill(values, &V::Missing);
                    map.next_value_seed(Reader {
                        node: next,
                        values: &mut *values,
                        root: false,
                    })?;
                }
                None => {
                    map.next_value::<Skip>()?;
                }
            }
        }
        if let Some(v) = node.end.and_then(|k| values.get_mut(k)) {
            *v = V::Undef;
        }
        Ok(())
    }
}

/// An object member's name, answered with the path node paths go on through from it.
struct Member<'p>(&'p PathNode);

impl<'de, 'p> serde::de::DeserializeSeed<'de> for Member<'p> {
    type Value = Option<&'p PathNode>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de, 'p> serde::de::Visitor<'de> for Member<'p> {
    type Value = Option<&'p PathNode>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a member name")
    }

    fn visit_str<E>(self, name: &str) -> Result<Self::Value, E> {
        Ok(self.0.member(name))
    }
}

/// A JSON value that no path reads: parsed as `serde_json::Value` parses it (numbers,
/// strings and escapes checked the same way, unlike `IgnoredAny`) and dropped.
struct Skip;

impl<'de> serde::Deserialize<'de> for Skip {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Skip)
    }
}

impl<'de> serde::de::Visitor<'de> for Skip {
    type Value = Skip;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_str<E>(self, _: &str) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Skip, A::Error> {
        while seq.next_element::<Skip>()?.is_some() {}
        Ok(Skip)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Skip, A::Error> {
        while map.next_entry::<Skip, Skip>()?.is_some() {}
        Ok(Skip)
    }
}

/// [`token_value`] of a string.
fn token_string(s: Cow<'_, str>) -> V<'_> {
    if is_newtonsoft_date(&s) {
        V::Undef
    } else {
        V::Str(s)
    }
}

// ---------------------------------------------------------------------------------------------
// Evaluation.
// ---------------------------------------------------------------------------------------------

/// A run-time value. What it means depends on the static type of the expression that made
/// it: string-typed expressions give `Str`, `NullStr` or `Undef`; numbers give `Num` (never
/// NaN: .NET's NaN double is edgeHub's undefined number) or `Undef`; booleans `Bool` or
/// `Undef`; body queries any of them, including a NaN `Num` and `Missing`.
// A plain tag, as for `Expr`: values are matched at every step.
#[derive(Debug, Clone)]
#[repr(u8)]
enum V<'a> {
    Undef,
    /// A null string: an application property edgeHub stored without a string value.
    NullStr,
    /// The null value (a literal, or JSON `null` in a body).
    Null,
    /// A body path that selected nothing. edgeHub makes that null too, but it is the shared
    /// `QueryValue.Null` instance, which `is_null` and `twin_change_includes` tell apart.
    Missing,
    Bool(bool),
    Num(f64),
    Str(Cow<'a, str>),
}

impl V<'_> {
    fn into_public(self) -> Value {
        match self {
            V::Undef => Value::Undefined,
            V::NullStr | V::Null | V::Missing => Value::Null,
            V::Bool(b) => Value::Bool(b),
            V::Num(x) if x.is_nan() => Value::Undefined,
            V::Num(x) => Value::Number(x),
            V::Str(s) => Value::String(s.into_owned()),
        }
    }

    fn is_undef(&self) -> bool {
        matches!(self, V::Undef)
    }

    /// The same value, borrowing its string instead of copying it.
    fn lend(&self) -> V<'_> {
        match self {
            V::Undef => V::Undef,
            V::NullStr => V::NullStr,
            V::Null => V::Null,
            V::Missing => V::Missing,
            V::Bool(b) => V::Bool(*b),
            V::Num(x) => V::Num(*x),
            V::Str(s) => V::Str(Cow::Borrowed(s)),
        }
    }

    fn as_bool(&self) -> Option<bool> {
        match self {
            V::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// QueryValueType order, used when a body query is compared with a value of another
    /// type: None < Bool < Double < String < Null.
    fn query_rank(&self) -> u8 {
        match self {
            V::Undef => 0,
            V::Bool(_) => 1,
            V::Num(_) => 2,
            V::Str(_) | V::NullStr => 3,
            V::Null | V::Missing => 4,
        }
    }
}

/// A number-typed result: NaN is undefined.
fn num<'a>(x: f64) -> V<'a> {
    if x.is_nan() {
        V::Undef
    } else {
        V::Num(x)
    }
}

/// An absent property is undefined.
fn property(v: Option<Prop<'_>>) -> V<'_> {
    match v {
        None | Some(Prop::Undefined) => V::Undef,
        Some(Prop::Str(s)) => V::Str(s),
        Some(Prop::NotString) => V::NullStr,
    }
}

/// One message's lookups and shared values, each computed the first time a condition reads
/// it and then reused (strings are lent, not copied).
pub struct Slots<'m> {
    reads: &'m Reads,
    msg: &'m dyn MessageView,
    /// The lookups' values, then the shared expressions' (booleans, numbers or undefined).
    values: Vec<OnceCell<V<'m>>>,
    /// Whether the plain body paths were read yet.
    body_read: Cell<bool>,
}

impl<'m> Slots<'m> {
    fn new(reads: &'m Reads, msg: &'m dyn MessageView) -> Self {
        Slots {
            reads,
            msg,
            values: std::iter::repeat_with(OnceCell::new)
                .take(reads.lookups.len() + reads.shared.len())
                .collect(),
            body_read: Cell::new(false),
        }
    }

    #[inline]
    fn lookup(&self, slot: usize) -> V<'_> {
        match self.values.get(slot).and_then(OnceCell::get) {
            Some(value) => value.lend(),
            None => self.first_lookup(slot),
        }
    }

    #[cold]
    fn first_lookup(&self, slot: usize) -> V<'_> {
        let (Some(value), Some(lookup)) = (self.values.get(slot), self.reads.lookups.get(slot))
        else {
            return V::Undef;
        };
        if matches!(lookup, Lookup::Body(_)) {
            self.read_body();
        }
        value.get_or_init(|| lookup.read(self.msg)).lend()
    }

    /// Reads every plain body path at once when the message offers the body's text; without
    /// it, each body lookup reads [`MessageView::body_json`].
    fn read_body(&self) {
        if self.body_read.replace(true) || self.reads.body.slots.is_empty() {
            return;
        }
        let Some(text) = self.msg.body_text() else {
            return;
        };
        let values = self.reads.body.read(text);
        for (value, &slot) in values.into_iter().zip(&self.reads.body.slots) {
            if let Some(cell) = self.values.get(slot) {
                // Not read before: `lookup` reads the body before any body path.
                let _ = cell.set(value);
            }
        }
    }

    #[inline]
    fn shared(&self, slot: usize) -> V<'static> {
        let value = self.values.get(self.reads.lookups.len() + slot);
        match value.and_then(OnceCell::get) {
            Some(value) => scalar(value),
            None => self.first_shared(slot),
        }
    }

    #[cold]
    fn first_shared(&self, slot: usize) -> V<'static> {
        let value = self.values.get(self.reads.lookups.len() + slot);
        let (Some(value), Some(e)) = (value, self.reads.shared.get(slot)) else {
            return V::Undef;
        };
        scalar(value.get_or_init(|| scalar(&eval(e, self))))
    }
}

/// A boolean, number or undefined value, which borrows nothing; shared expressions give
/// nothing else (see [`Expr::shareable`]).
fn scalar(v: &V<'_>) -> V<'static> {
    match v {
        V::Bool(b) => V::Bool(*b),
        V::Num(x) => V::Num(*x),
        _ => V::Undef,
    }
}

/// [`eval`] with the common leaves (lookups and literals) read in place, saving a call per
/// operand: most comparisons are a lookup against a literal.
#[inline(always)]
fn operand<'a>(e: &'a Expr, slots: &'a Slots<'_>) -> V<'a> {
    match e {
        Expr::Lookup(i) => slots.lookup(*i),
        Expr::Shared(i) => slots.shared(*i),
        Expr::Str(s) => V::Str(Cow::Borrowed(s)),
        Expr::Num(x) => V::Num(*x),
        Expr::Cmp { op, kind, l, r } => comparison(*op, *kind, l, r, slots),
        Expr::StrEq {
            subject,
            literal,
            equal,
            query,
        } => string_equality(subject, literal, *equal, *query, slots),
        Expr::Logic { and, kleene, l, r } => logic(*and, *kleene, l, r, slots),
        _ => eval(e, slots),
    }
}

/// [`Expr::StrEq`]: as [`compare`] decides it for a string literal. A string-typed subject
/// that is not a string is undefined; a body query of another type is simply not equal.
#[inline(never)]
fn string_equality<'a>(
    subject: &'a Expr,
    literal: &str,
    equal: bool,
    query: bool,
    slots: &'a Slots<'_>,
) -> V<'a> {
    match operand(subject, slots) {
        V::Str(s) => V::Bool(same_bytes(s.as_bytes(), literal.as_bytes()) == equal),
        V::Undef => V::Undef,
        _ if query => V::Bool(!equal),
        _ => V::Undef,
    }
}

/// A comparison node, outside [`eval`] whose many cases make every call to it costlier.
#[inline(never)]
fn comparison<'a>(op: Cmp, kind: Ty, l: &'a Expr, r: &'a Expr, slots: &'a Slots<'_>) -> V<'a> {
    compare(op, kind, &operand(l, slots), &operand(r, slots))
}

fn eval<'a>(e: &'a Expr, slots: &'a Slots<'_>) -> V<'a> {
    match e {
        Expr::Undef => V::Undef,
        Expr::Null => V::Null,
        Expr::Bool(b) => V::Bool(*b),
        Expr::Num(x) => V::Num(*x),
        Expr::Str(s) => V::Str(Cow::Borrowed(s)),
        Expr::Lookup(i) => slots.lookup(*i),
        Expr::Shared(i) => slots.shared(*i),
        Expr::AppOr { app, or } => match slots.lookup(*app) {
            V::Undef => slots.lookup(*or),
            v => v,
        },
        Expr::Neg(x) => match operand(x, slots) {
            V::Num(v) => num(-v),
            _ => V::Undef,
        },
        Expr::Not(x) => match operand(x, slots) {
            V::Bool(b) => V::Bool(!b),
            _ => V::Undef,
        },
        Expr::Arith { op, query, l, r } => arith(*op, *query, operand(l, slots), operand(r, slots)),
        Expr::Cmp { op, kind, l, r } => comparison(*op, *kind, l, r, slots),
        Expr::StrEq {
            subject,
            literal,
            equal,
            query,
        } => string_equality(subject, literal, *equal, *query, slots),
        Expr::Logic { and, kleene, l, r } => logic(*and, *kleene, l, r, slots),
        Expr::Coalesce(l, r) => {
            let v = eval(l, slots);
            if v.is_undef() {
                eval(r, slots)
            } else {
                v
            }
        }
        Expr::Call(f, args) => call(*f, args, slots),
    }
}

/// BodyQuery.Runtime: objects, arrays, several matches and strings Newtonsoft reads as dates
/// are undefined; a path that matches nothing is null (verified in JsonMessageQueryValueProvider:
/// no token gives QueryValue.Null, so `$body.missing = null` is true).
fn body_query<'m>(path: &JsonPath, msg: &'m dyn MessageView) -> V<'m> {
    let (Some(root @ serde_json::Value::Object(_)), Some(steps)) = (msg.body_json(), &path.steps)
    else {
        return V::Undef;
    };
    match select(root, steps) {
        None | Some(Selected::Many) => V::Undef,
        Some(Selected::Nothing) => V::Missing,
        Some(Selected::One(v)) => token_value(v),
    }
}

/// TwinChangeIncludes.Runtime: true when the path selects anything (even null or an
/// object), false when it selects nothing, undefined without a twin change body.
fn twin_change_includes<'m>(path: &JsonPath, msg: &'m dyn MessageView) -> V<'m> {
    let (Some(root @ serde_json::Value::Object(_)), Some(steps)) = (msg.twin_change(), &path.steps)
    else {
        return V::Undef;
    };
    match select(root, steps) {
        None => V::Undef,
        Some(Selected::Nothing) => V::Bool(false),
        Some(_) => V::Bool(true),
    }
}

fn arith<'a>(op: Arith, query: bool, a: V<'a>, b: V<'a>) -> V<'a> {
    let (V::Num(a), V::Num(b)) = (a, b) else {
        return V::Undef;
    };
    // .NET's `%` on doubles truncates like Rust's.
    let x = match op {
        Arith::Add => a + b,
        Arith::Sub => a - b,
        Arith::Mul => a * b,
        Arith::Div => a / b,
        Arith::Mod => a % b,
    };
    if query {
        V::Num(x)
    } else {
        num(x)
    }
}

/// `a == b`, without a library call for the short strings routes compare.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x == y)
}

/// `string.Compare(a, b, StringComparison.Ordinal)`: UTF-16 code units.
fn ordinal_cmp(a: &str, b: &str) -> Ordering {
    // Byte order equals UTF-16 order for ASCII (and for all text below U+E000, but not
    // beyond): compare bytes when both are ASCII, code units otherwise.
    if a.is_ascii() && b.is_ascii() {
        a.as_bytes().cmp(b.as_bytes())
    } else {
        a.encode_utf16().cmp(b.encode_utf16())
    }
}

/// `double.CompareTo`: NaN is equal to itself and below everything else.
fn dotnet_double_cmp(a: f64, b: f64) -> Ordering {
    match a.partial_cmp(&b) {
        Some(o) => o,
        None if a.is_nan() && b.is_nan() => Ordering::Equal,
        None if a.is_nan() => Ordering::Less,
        None => Ordering::Greater,
    }
}

/// ComparisonOperators.Compare for each static type.
fn compare<'a>(op: Cmp, kind: Ty, a: &V<'a>, b: &V<'a>) -> V<'a> {
    // Most route conditions test strings for equality, which needs no ordering: strings are
    // equal in UTF-16 exactly when their bytes are.
    if let (Cmp::Eq | Cmp::Ne, Ty::Str | Ty::Query, V::Str(x), V::Str(y)) = (op, kind, a, b) {
        return V::Bool(same_bytes(x.as_bytes(), y.as_bytes()) == (op == Cmp::Eq));
    }
    let ord = match kind {
        Ty::Query => {
            if a.is_undef() || b.is_undef() {
                return V::Undef;
            }
            // QueryValue.CompareTo: different types order by QueryValueType, so a number is
            // never equal to a string (`$body.n = '5'` is false, not undefined).
            match (a, b) {
                _ if a.query_rank() != b.query_rank() => a.query_rank().cmp(&b.query_rank()),
                (V::Bool(x), V::Bool(y)) => x.cmp(y),
                (V::Num(x), V::Num(y)) => dotnet_double_cmp(*x, *y),
                (V::Str(x), V::Str(y)) => ordinal_cmp(x, y),
                // A null string sorts first, as in string.Compare.
                (V::NullStr, V::Str(_)) => Ordering::Less,
                (V::Str(_), V::NullStr) => Ordering::Greater,
                _ => Ordering::Equal,
            }
        }
        // null = null, null <= null, null >= null hold; the others do not.
        Ty::Null => Ordering::Equal,
        Ty::Str => match (a, b) {
            (V::Str(x), V::Str(y)) => ordinal_cmp(x, y),
            _ => return V::Undef,
        },
        Ty::Num => match (a, b) {
            (V::Num(x), V::Num(y)) => match x.partial_cmp(y) {
                Some(o) => o,
                None => return V::Undef,
            },
            _ => return V::Undef,
        },
        Ty::Bool => match (a, b) {
            (V::Bool(x), V::Bool(y)) => x.cmp(y),
            _ => return V::Undef,
        },
        Ty::Undef => return V::Undef,
    };
    V::Bool(op.holds(ord))
}

#[inline(never)]
fn logic<'a>(and: bool, kleene: bool, l: &'a Expr, r: &'a Expr, slots: &'a Slots<'_>) -> V<'a> {
    let a = operand(l, slots);
    if !kleene {
        return match (a, operand(r, slots)) {
            (V::Bool(x), V::Bool(y)) => V::Bool(if and { x && y } else { x || y }),
            _ => V::Undef,
        };
    }
    let a = a.as_bool();
    // Kleene logic decides on one operand; evaluation is pure, so the other can be skipped.
    if a == Some(!and) {
        return V::Bool(!and);
    }
    let b = operand(r, slots).as_bool();
    match (a, b) {
        (_, Some(x)) if x != and => V::Bool(x),
        (Some(x), Some(y)) => V::Bool(if and { x && y } else { x || y }),
        _ => V::Undef,
    }
}

fn string_arg<'v>(v: &'v V<'_>) -> Option<&'v str> {
    match v {
        V::Str(s) => Some(s.as_ref()),
        _ => None,
    }
}

fn call<'a>(f: Func, args: &'a [Expr], slots: &'a Slots<'_>) -> V<'a> {
    let arg = |i: usize| args.get(i).map_or(V::Undef, |e| operand(e, slots));
    match f {
        Func::Math(m) => match arg(0) {
            V::Num(x) => num(match m {
                Math::Abs => x.abs(),
                Math::Exp => x.exp(),
                Math::Ceiling => x.ceil(),
                Math::Floor => x.floor(),
                Math::Sign if x.is_nan() => f64::NAN,
                Math::Sign if x > 0.0 => 1.0,
                Math::Sign if x < 0.0 => -1.0,
                Math::Sign => 0.0,
                Math::Sqrt => x.sqrt(),
                Math::Square => x.powf(2.0),
            }),
            _ => V::Undef,
        },
        Func::Power => match (arg(0), arg(1)) {
            (V::Num(x), V::Num(y)) => num(x.powf(y)),
            _ => V::Undef,
        },
        Func::AsNumber => match arg(0) {
            V::Str(s) => dotnet_parse_double(&s).map_or(V::Undef, num),
            V::Num(x) => num(x),
            _ => V::Undef,
        },
        Func::IsBool => match arg(0) {
            V::Undef => V::Undef,
            v => V::Bool(matches!(v, V::Bool(_))),
        },
        Func::IsDefined => V::Bool(!arg(0).is_undef()),
        Func::IsNullString => V::Bool(matches!(arg(0), V::NullStr)),
        // IsNull.RuntimeQueryValue returns `input != QueryValue.Null` (reference inequality):
        // true for every defined body value except a path that selected nothing. That is
        // edgeHub's behaviour, kept.
        Func::IsNullQuery => match arg(0) {
            V::Undef => V::Undef,
            V::Missing => V::Bool(false),
            _ => V::Bool(true),
        },
        Func::IsNumber => V::Bool(matches!(arg(0), V::Num(x) if x.is_finite())),
        Func::IsString => V::Bool(matches!(arg(0), V::Str(_))),
        Func::Concat => {
            let mut out = String::new();
            for e in args {
                match eval(e, slots) {
                    V::Str(s) => out.push_str(&s),
                    // A null string is defined and concatenates as nothing.
                    V::NullStr => {}
                    _ => return V::Undef,
                }
            }
            V::Str(Cow::Owned(out))
        }
        Func::Length => match arg(0) {
            V::Str(s) => num(s.encode_utf16().count() as f64),
            _ => V::Undef,
        },
        Func::Lower => match arg(0) {
            V::Str(s) => V::Str(Cow::Owned(dotnet_lower(&s))),
            _ => V::Undef,
        },
        Func::Upper => match arg(0) {
            V::Str(s) => V::Str(Cow::Owned(dotnet_upper(&s))),
            _ => V::Undef,
        },
        Func::Substring | Func::SubstringLength => {
            let s = arg(0);
            let (V::Str(s), V::Num(start)) = (s, arg(1)) else {
                return V::Undef;
            };
            let length = if f == Func::SubstringLength {
                match arg(2) {
                    V::Num(n) => Some(n),
                    _ => return V::Undef,
                }
            } else {
                None
            };
            substring(&s, start, length).map_or(V::Undef, |s| V::Str(Cow::Owned(s)))
        }
        Func::IndexOf | Func::StartsWith | Func::EndsWith | Func::Contains => {
            let (a, b) = (arg(0), arg(1));
            let (Some(a), Some(b)) = (string_arg(&a), string_arg(&b)) else {
                return V::Undef;
            };
            match f {
                Func::IndexOf => num(a.find(b).map_or(-1.0, |i| {
                    a.get(..i).map_or(0, |p| p.encode_utf16().count()) as f64
                })),
                Func::StartsWith => V::Bool(a.starts_with(b)),
                Func::EndsWith => V::Bool(a.ends_with(b)),
                _ => V::Bool(a.contains(b)),
            }
        }
    }
}

/// Substring.RuntimeStart / RuntimeStartLength, in UTF-16 code units with .NET's bounds.
fn substring(s: &str, start: f64, length: Option<f64>) -> Option<String> {
    let units: Vec<u16> = s.encode_utf16().collect();
    let len = units.len() as f64;
    let range = match length {
        None if start >= 0.0 && start <= len => (start as usize)..units.len(),
        Some(n) if start >= 0.0 && start < len && n >= 0.0 && n <= len - start => {
            (start as usize)..(start as usize + n as usize)
        }
        _ => return None,
    };
    units.get(range).map(String::from_utf16_lossy)
}

fn single_char(mut it: impl Iterator<Item = char>) -> Option<char> {
    let c = it.next()?;
    it.next().is_none().then_some(c)
}

/// ToLowerInvariant: one-to-one simple case mapping; .NET leaves U+0130 alone.
fn dotnet_lower(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '\u{130}' => c,
            _ => single_char(c.to_lowercase()).unwrap_or(c),
        })
        .collect()
}

/// ToUpperInvariant: one-to-one simple case mapping; .NET leaves U+0131 alone.
fn dotnet_upper(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '\u{131}' => c,
            _ => single_char(c.to_uppercase()).unwrap_or(c),
        })
        .collect()
}

/// Newtonsoft reads JSON strings that look like dates as dates (DateParseHandling.DateTime),
/// and edgeHub's QueryValue treats a date as an object, so `$body.time` is undefined when
/// `time` holds an ISO 8601 date-time or `/Date(…)/`.
fn is_newtonsoft_date(s: &str) -> bool {
    let b = s.as_bytes();
    match b.first() {
        Some(b'/') => s.starts_with("/Date(") && s.ends_with(")/") && microsoft_date(s),
        Some(c) if c.is_ascii_digit() => {
            s.is_ascii() && (19..=40).contains(&b.len()) && b.get(10) == Some(&b'T') && iso_date(b)
        }
        _ => false,
    }
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        4 | 6 | 9 | 11 => 30,
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        _ => 31,
    }
}

/// Newtonsoft's DateTimeParser: `yyyy-MM-ddTHH:mm:ss[.f{1,7}][Z|±HH[:]mm]`.
fn iso_date(b: &[u8]) -> bool {
    let end = b.len();
    let digit = |i: usize| {
        b.get(i)
            .filter(|c| c.is_ascii_digit())
            .map(|c| u32::from(c - b'0'))
    };
    let d2 = |i: usize| Some(digit(i)? * 10 + digit(i + 1)?);
    let d4 = |i: usize| Some(d2(i)? * 100 + d2(i + 2)?);
    let is = |i: usize, c: u8| b.get(i) == Some(&c);
    // ParseDate and ParseTime: each field in its place and range.
    let time = || -> Option<u32> {
        let year = d4(0).filter(|y| *y >= 1)?;
        let month = d2(5).filter(|m| is(4, b'-') && (1..=12).contains(m))?;
        d2(8).filter(|d| is(7, b'-') && (1..=days_in_month(year, month)).contains(d))?;
        let hour = d2(11).filter(|h| is(10, b'T') && *h <= 24)?;
        let minute = d2(14).filter(|m| is(13, b':') && *m < 60)?;
        let second = d2(17).filter(|s| is(16, b':') && *s < 60)?;
        (hour != 24 || (minute == 0 && second == 0)).then_some(hour)
    };
    let Some(hour) = time() else {
        return false;
    };
    let mut start = 19;
    if is(start, b'.') {
        let mut fraction = 0u32;
        let mut digits = 0;
        loop {
            start += 1;
            if !(start < end && digits < 7) {
                break;
            }
            let Some(d) = digit(start) else {
                break;
            };
            fraction = fraction * 10 + d;
            digits += 1;
        }
        if digits == 0 || (hour == 24 && fraction != 0) {
            return false;
        }
    }
    // ParseZone
    if start < end {
        match b.get(start) {
            Some(b'Z' | b'z') => start += 1,
            c => {
                if start + 2 < end && d2(start + 1).is_some() && matches!(c, Some(b'+' | b'-')) {
                    start += 3;
                }
                if start < end {
                    if is(start, b':') {
                        start += 1;
                    }
                    if start + 1 < end && d2(start).is_some() {
                        start += 2;
                    }
                }
            }
        }
    }
    start == end
}

/// Newtonsoft's `/Date(ticks[±HHmm])/`, on UTF-16 code units like the original. The offset's
/// minutes are not checked: Newtonsoft's test for them compares the string length with a
/// position in its read buffer, so whether it reads them depends on where the string sat.
fn microsoft_date(s: &str) -> bool {
    let u: Vec<u16> = s.encode_utf16().collect();
    let len = u.len();
    if len < 9 {
        return false;
    }
    let find = |c: u8| (7..len - 1).find(|&k| u.get(k) == Some(&u16::from(c)));
    let ticks_end = match find(b'+').or_else(|| find(b'-')) {
        Some(k) => {
            if u.get(k + 1..k + 3)
                .and_then(|d| newtonsoft_int(d, 32))
                .is_none()
            {
                return false;
            }
            k
        }
        None => len - 2,
    };
    u.get(6..ticks_end)
        .and_then(|d| newtonsoft_int(d, 64))
        .is_some()
}

/// ConvertUtils.Int32TryParse / Int64TryParse: optional `-`, ASCII digits, no overflow.
fn newtonsoft_int(units: &[u16], bits: u32) -> Option<i128> {
    let (negative, digits) = match units.split_first() {
        Some((&m, rest)) if m == u16::from(b'-') => (true, rest),
        _ => (false, units),
    };
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    let mut v: i128 = 0;
    for &d in digits {
        let d = u8::try_from(d).ok().filter(u8::is_ascii_digit)?;
        v = v * 10 + i128::from(d - b'0');
    }
    let v = if negative { -v } else { v };
    let limit = 1i128 << (bits - 1);
    (-limit..limit).contains(&v).then_some(v)
}

/// `double.TryParse(s, NumberStyles.Any, CultureInfo.InvariantCulture)` (as_number):
/// surrounding white space, a leading or trailing sign or parentheses, `,` group separators in
/// the integer part, `.`, an exponent, the currency sign `¤`, and the invariant culture's
/// `Infinity`/`-Infinity`/`NaN` in any case.
fn dotnet_parse_double(s: &str) -> Option<f64> {
    parse_number_any(s).or_else(|| {
        let t = s.trim();
        let is = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
        if is(t, "Infinity") {
            Some(f64::INFINITY)
        } else if is(t, "-Infinity") {
            Some(f64::NEG_INFINITY)
        } else if is(t, "NaN") {
            Some(f64::NAN)
        } else if let Some(rest) = t.strip_prefix('+') {
            if is(rest, "Infinity") {
                Some(f64::INFINITY)
            } else if is(rest, "NaN") {
                Some(f64::NAN)
            } else {
                None
            }
        } else {
            t.strip_prefix('-')
                .filter(|rest| is(rest, "NaN"))
                .map(|_| f64::NAN)
        }
    })
}

/// The common case, `[+-]digits[.digits][e[+-]digits]` with a non-zero digit: Rust's parser
/// reads it exactly as .NET does (both round correctly), without the general path's allocations.
fn plain_decimal(s: &str) -> Option<f64> {
    let b = s.as_bytes();
    let mut i = usize::from(matches!(b.first(), Some(b'+' | b'-')));
    let start = i;
    let mut nonzero = false;
    let mut dot = false;
    while let Some(&c) = b.get(i) {
        match c {
            b'0'..=b'9' => nonzero |= c != b'0',
            b'.' if !dot => dot = true,
            _ => break,
        }
        i += 1;
    }
    if i == start || !nonzero {
        return None;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let digits = i;
        while matches!(b.get(i), Some(b'0'..=b'9')) {
            i += 1;
        }
        if i == digits {
            return None;
        }
    }
    if i != b.len() {
        return None;
    }
    s.parse().ok()
}

/// Number.TryParseNumber for NumberStyles.Any with the invariant culture.
fn parse_number_any(s: &str) -> Option<f64> {
    if let Some(v) = plain_decimal(s) {
        return Some(v);
    }
    const SIGN: u8 = 1;
    const PARENS: u8 = 2;
    const DIGITS: u8 = 4;
    const NONZERO: u8 = 8;
    const DECIMAL: u8 = 16;
    const CURRENCY: u8 = 32;
    let c: Vec<char> = s.chars().collect();
    let at = |i: usize| c.get(i).copied().unwrap_or('\0');
    let white = |ch: char| ch == ' ' || ('\u{9}'..='\u{d}').contains(&ch);
    let mut p = 0;
    let mut state = 0u8;
    let mut negative = false;
    let mut currency_left = true;
    loop {
        let ch = at(p);
        // White space is skipped until a sign is seen (unless a currency sign followed it).
        if !white(ch) || (state & SIGN != 0 && state & CURRENCY == 0) {
            if state & SIGN == 0 && (ch == '+' || ch == '-') {
                state |= SIGN;
                negative = ch == '-';
            } else if ch == '(' && state & SIGN == 0 {
                state |= SIGN | PARENS;
                negative = true;
            } else if currency_left && ch == '¤' {
                state |= CURRENCY;
                currency_left = false;
            } else {
                break;
            }
        }
        p += 1;
    }
    let mut int_digits = String::new();
    let mut frac_digits = String::new();
    loop {
        let ch = at(p);
        if ch.is_ascii_digit() {
            state |= DIGITS;
            if ch != '0' {
                state |= NONZERO;
            }
            if state & DECIMAL == 0 {
                int_digits.push(ch);
            } else {
                frac_digits.push(ch);
            }
        } else if ch == '.' && state & DECIMAL == 0 {
            state |= DECIMAL;
        } else if !(ch == ',' && state & DIGITS != 0 && state & DECIMAL == 0) {
            break;
        }
        p += 1;
    }
    if state & DIGITS == 0 {
        return None;
    }
    let mut exponent: i32 = 0;
    if matches!(at(p), 'e' | 'E') {
        let mark = p;
        p += 1;
        let mut negative_exponent = false;
        match at(p) {
            '+' => p += 1,
            '-' => {
                negative_exponent = true;
                p += 1;
            }
            _ => {}
        }
        if at(p).is_ascii_digit() {
            while let Some(d) = at(p).to_digit(10) {
                // .NET stops counting past 1000 and uses 9999.
                exponent = if exponent > 1000 {
                    9999
                } else {
                    exponent * 10 + i32::try_from(d).unwrap_or(0)
                };
                p += 1;
            }
            if exponent > 1000 {
                exponent = 9999;
            }
            if negative_exponent {
                exponent = -exponent;
            }
        } else {
            p = mark;
        }
    }
    loop {
        let ch = at(p);
        if !white(ch) {
            if state & SIGN == 0 && (ch == '+' || ch == '-') {
                state |= SIGN;
                negative = ch == '-';
            } else if ch == ')' && state & PARENS != 0 {
                state &= !PARENS;
            } else if currency_left && ch == '¤' {
                currency_left = false;
            } else {
                break;
            }
        }
        p += 1;
    }
    // The parse must use the whole string; trailing NULs are allowed.
    if state & PARENS != 0 || c.get(p..).unwrap_or(&[]).iter().any(|&ch| ch != '\0') {
        return None;
    }
    if state & NONZERO == 0 && state & DECIMAL == 0 {
        negative = false;
    }
    let int_part = if int_digits.is_empty() {
        "0"
    } else {
        &int_digits
    };
    let frac_part = if frac_digits.is_empty() {
        "0"
    } else {
        &frac_digits
    };
    let sign = if negative { "-" } else { "" };
    format!("{sign}{int_part}.{frac_part}e{exponent}")
        .parse::<f64>()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A message in the shape of edgeHub's ConditionCompilerTest and BodyQueryTest messages.
    struct Msg {
        app: Vec<(&'static str, Value)>,
        sys: Vec<(&'static str, Value)>,
        body: Option<serde_json::Value>,
        twin: Option<serde_json::Value>,
    }

    fn lookup(list: &[(&'static str, Value)], name: &str) -> Option<Value> {
        // edgeHub's property maps ignore case.
        list.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }

    impl MessageView for Msg {
        fn app_property(&self, name: &str) -> Option<Value> {
            lookup(&self.app, name)
        }
        fn system_property(&self, name: &str) -> Option<Value> {
            lookup(&self.sys, name)
        }
        fn body_json(&self) -> Option<&serde_json::Value> {
            self.body.as_ref()
        }
        fn twin_change(&self) -> Option<&serde_json::Value> {
            self.twin.as_ref()
        }
    }

    fn s(v: &str) -> Value {
        Value::String(v.to_owned())
    }

    fn msg() -> Msg {
        Msg {
            app: vec![
                ("key1", s("value1")),
                ("key2", s("3")),
                ("key3", s("VALUE3")),
                ("null_value", Value::Null),
                ("int_prop", Value::Number(5.0)),
                ("$sys4", s("value4")),
                ("$body.shadowed", s("100")),
                ("a+b", s("plus")),
                ("temperature", s("25.5")),
                ("unicode", s("Tchüss😀")),
            ],
            sys: vec![
                ("sys1", s("sysvalue1")),
                ("sys2", s("4")),
                ("sys3", s("SYSVALUE3")),
                ("sys4", s("sysvalue4")),
                ("messageId", s("mid-1")),
                ("contentType", s("application/json")),
                ("contentEncoding", s("utf-8")),
                ("connectionDeviceId", s("dev1")),
                ("connectionModuleId", s("mod1")),
            ],
            body: Some(json!({
                "temp": 50,
                "neg": -50.4,
                "precise": 50.4,
                "zero": 0,
                "street": "One Microsoft Way",
                "state": "WA",
                "flag": true,
                "off": false,
                "nothing": null,
                "time": "2017-03-09T00:00:00.000Z",
                "day": "2017-03-09",
                "list": [20, 30, 40],
                "nested": {"a": {"b": [{"c": 1}, {"c": 2}]}, "m": [[1, 2], [3]]},
                "shadowed": 50,
                "$x": "dollar",
                "single": {"only": 7},
                "Weather": {"Temperature": 50}
            })),
            twin: None,
        }
    }

    /// The same message when its content type is not JSON: the caller gives no body.
    fn msg_no_json() -> Msg {
        Msg {
            body: None,
            ..msg()
        }
    }

    fn msg_twin() -> Msg {
        Msg {
            twin: Some(json!({
                "properties": {
                    "reported": {
                        "WeatherTwin": {"Temperature": 50, "Location": {"City": "Redmond"}},
                        "nul": null,
                        "$version": 4
                    },
                    "desired": {}
                },
                "tags": {"site": "a"}
            })),
            ..msg()
        }
    }

    const T: Value = Value::Bool(true);
    const F: Value = Value::Bool(false);
    const U: Value = Value::Undefined;
    const N: Value = Value::Null;

    fn n(x: f64) -> Value {
        Value::Number(x)
    }

    /// `Msg` that also offers its body as text, so that plain body paths are read in one
    /// pass over it instead of from `body_json`.
    struct WithText<'a> {
        msg: &'a Msg,
        text: Option<String>,
    }

    impl<'a> WithText<'a> {
        fn new(msg: &'a Msg) -> Self {
            let text = msg.body.as_ref().map(|b| b.to_string());
            WithText { msg, text }
        }
    }

    impl MessageView for WithText<'_> {
        fn app_property(&self, name: &str) -> Option<Value> {
            self.msg.app_property(name)
        }
        fn system_property(&self, name: &str) -> Option<Value> {
            self.msg.system_property(name)
        }
        fn body_json(&self) -> Option<&serde_json::Value> {
            self.msg.body_json()
        }
        fn twin_change(&self) -> Option<&serde_json::Value> {
            self.msg.twin_change()
        }
        fn body_text(&self) -> Option<&str> {
            self.text.as_deref()
        }
    }

    /// Checks every case alone, then all of them together in one [`ConditionSet`] (each
    /// twice, so that every condition is also a shared subexpression), from `body_json` and
    /// from the body's text.
    fn check(cases: &[(&str, Value)], m: &Msg) -> usize {
        let mut failures = Vec::new();
        let mut compiled = Vec::new();
        for (text, want) in cases {
            match Condition::parse(text) {
                Ok(c) => {
                    let got = c.evaluate(m);
                    if &got != want {
                        failures.push(format!("{text:?}: got {got:?}, want {want:?}"));
                    }
                    assert_eq!(c.matches(m), got == T, "{text:?}");
                    assert_eq!(c.evaluate(&WithText::new(m)), got, "{text:?} from text");
                    compiled.push((text, c, want));
                }
                Err(e) => failures.push(format!("{text:?}: {e}")),
            }
        }
        let list: Vec<&Condition> = compiled.iter().flat_map(|(_, c, _)| [c, c]).collect();
        let set = ConditionSet::new(&list);
        let with_text = WithText::new(m);
        for view in [m as &dyn MessageView, &with_text] {
            let slots = set.slots(view);
            // Backwards, so that shared values are often first needed by a later condition.
            for (i, (text, _, want)) in compiled.iter().enumerate().rev() {
                for k in [2 * i + 1, 2 * i] {
                    let got = set.evaluate(k, &slots);
                    if &got != *want {
                        failures.push(format!("{text:?} in a set: got {got:?}, want {want:?}"));
                    }
                    assert_eq!(set.matches(k, &slots), got == T, "{text:?} in a set");
                }
            }
        }
        assert!(failures.is_empty(), "\n{}", failures.join("\n"));
        cases.len()
    }

    #[test]
    fn literals_and_lexing() {
        let cases = [
            ("true", T),
            ("false", F),
            ("null", N),
            ("undefined", U),
            ("3", n(3.0)),
            ("0100", n(100.0)),
            ("-1.234", n(-1.234)),
            ("12.34", n(12.34)),
            (".5", n(0.5)),
            ("1.234e1", n(12.34)),
            ("1.234e+1", n(12.34)),
            ("1.234E-1", n(0.1234)),
            ("2e3", n(2000.0)),
            ("10e1000", n(f64::INFINITY)),
            ("0xDEADBEEF", n(3_735_928_559.0)),
            ("0xdeadbeef = 3735928559", T),
            ("0x00000000000000000001", n(1.0)),
            ("0xFFFFFFFFFFFFFFFF", n(-1.0)),
            // .NET cannot parse these, so edgeHub compiles them to undefined.
            ("e5", U),
            ("0x1FFFFFFFFFFFFFFFF", U),
            ("'a string'", s("a string")),
            ("\"a string\"", s("a string")),
            ("''", s("")),
            (r#""he said, \"Hello!\"""#, s("he said, \"Hello!\"")),
            (r"'it\'s'", s("it's")),
            (r"'back\\slash'", s("back\\slash")),
            (r"'Tch\u00FCss'", s("Tchüss")),
            (r"'\ud83d\ude00'", s("😀")),
            // The two unescape passes of edgeHub run one after the other.
            (r"'\\u0041'", s("\\A")),
            ("'line\nbreak'", s("line\nbreak")),
            ("(((3)))", n(3.0)),
            ("/* comment */ true", T),
            ("true /* a = 'b' */", T),
            ("1 /**/ = /* x */ 1", T),
            // Identifiers swallow operator characters: `a+b` is one application property.
            ("a+b", s("plus")),
            ("a+b = 'plus'", T),
            ("3-1", U),
            ("1 - -2", n(3.0)),
            ("-undefined", U),
            ("'abc'd", U),
            ("TRUE", U),
            ("True = 'x'", U),
            ("trueish", U),
            ("1.5.2", U),
            ("key1!='x'", U),
            ("key1 != 'x'", T),
        ];
        check(&cases, &msg());
    }

    #[test]
    fn operators() {
        let cases = [
            // arithmetic
            ("3 + 4", n(7.0)),
            ("3 + 4 * 5", n(23.0)),
            ("3 + 4 / 4", n(4.0)),
            ("3 - (4 + 0x10)", n(-17.0)),
            ("3 / 4", n(0.75)),
            ("3 / 0", n(f64::INFINITY)),
            ("-3 / 0", n(f64::NEG_INFINITY)),
            ("3 % 4", n(3.0)),
            ("-7 % 3", n(-1.0)),
            ("3 % 0", U),
            ("-(1.234 + 2)", n(-3.234)),
            ("- 5", n(-5.0)),
            ("- -5", n(5.0)),
            ("-(3 % 0)", U),
            ("10 - 2 - 3", n(5.0)),
            ("12 / 2 / 3", n(2.0)),
            ("3 + as_number(key2)", n(6.0)),
            ("3 + as_number(none)", U),
            // string concatenation
            ("'a' || 'b' || 'c'", s("abc")),
            ("'a' || key1 || 'd'", s("avalue1d")),
            ("'a' || null_value || 'd'", s("ad")),
            ("'a' || none || 'd'", U),
            ("'a' || $body.street", s("aOne Microsoft Way")),
            ("'a' || $body.temp", U),
            // comparisons
            ("4 < 7", T),
            ("7 < 7", F),
            ("7 <= 7", T),
            ("8 > 7", T),
            ("7 >= 8", F),
            ("3 + 4 <= 7", T),
            ("'a' < 'b'", T),
            ("'b' >= 'a'", T),
            ("'Z' < 'a'", T),
            ("'a' < none", U),
            ("3 < as_number(none)", U),
            ("true > false", T),
            ("false < true", T),
            ("true >= true", T),
            ("null <= null", T),
            ("null < null", F),
            ("undefined < undefined", U),
            // U+FFFD sorts after U+1F600 in UTF-16 (a surrogate pair), unlike in UTF-8.
            ("'\u{1F600}' < '\u{FFFD}'", T),
            // equality
            ("3 = 3", T),
            ("3 = 4", F),
            ("3 != 3", F),
            ("3 <> 4", T),
            ("'3' = '3'", T),
            ("\"3\" <> \"4\"", T),
            ("true = true", T),
            ("true = false", F),
            ("false != true", T),
            ("null = null", T),
            ("null != null", F),
            ("undefined = undefined", U),
            ("key2 = '3'", T),
            ("key2 != '3'", F),
            ("none = 'x'", U),
            ("none <> 'x'", U),
            ("0 = -0", T),
            ("1 < 2 = 3 < 4", T),
            // precedence: NOT binds tighter than comparison, AND than OR, ?? loosest
            ("NOT false = true", T),
            ("not (true and false)", T),
            ("true or false and false", T),
            ("(true or false) and false", F),
            ("NOT NOT true", T),
            // logic
            ("true AND true", T),
            ("true and false", F),
            ("TRUE = 'x' or true", T),
            ("false or false", F),
            ("not true", F),
            ("not null", T),
            ("undefined or false", U),
            ("undefined or true", T),
            ("true or undefined", T),
            ("false or undefined", U),
            ("undefined or undefined", U),
            ("true and undefined", U),
            ("false and undefined", F),
            ("undefined and false", F),
            ("undefined and undefined", U),
            ("none = 'true' or true", T),
            ("none = 'true' or false", U),
            ("none = 'true' and false", F),
            ("none = 'true' and true", U),
            ("not (none = 'true')", U),
            ("null and null", N),
            ("null and true", N),
            ("(null and false) = null", T),
            ("null or true", T),
            ("null or false", F),
            ("null or null", N),
            ("null or (none = 'x')", U),
            // coalesce
            ("undefined ?? undefined", U),
            ("(key1 ?? 'hello') = 'value1'", T),
            ("(none ?? 'hello') = 'hello'", T),
            ("none ?? none ?? 'hello'", s("hello")),
            ("as_number(key1) ?? 12.34", n(12.34)),
            ("3 % 0 ?? 1", n(1.0)),
            ("null_value ?? 'x'", N),
            ("null ?? null", N),
            ("$body.temp ?? 1", n(50.0)),
            ("$body.missing ?? 1", N),
            ("$body.list ?? 'x'", s("x")),
        ];
        check(&cases, &msg());
    }

    #[test]
    fn references() {
        let cases = [
            // bare names are application properties, looked up ignoring case
            ("key1", s("value1")),
            ("KEY1 = 'value1'", T),
            ("none", U),
            ("sys1", U),
            // non-string application properties are null strings, as in edgeHub
            ("null_value", N),
            ("int_prop", N),
            ("int_prop = '5'", U),
            ("is_defined(int_prop)", T),
            ("is_null(int_prop)", T),
            // $name: application property `$name` first, then system property `name`
            ("$sys1", s("sysvalue1")),
            ("$SYS1 = 'sysvalue1'", T),
            ("$sys4", s("value4")),
            ("{$sys4}", s("sysvalue4")),
            ("{ $sys1 } = 'sysvalue1'", T),
            ("$messageId", s("mid-1")),
            ("$connectionModuleId = 'mod1'", T),
            ("is_defined($none)", F),
            ("NOT is_defined($outputName)", T),
            ("$sys2 = '4'", T),
            ("as_number($sys2) = 4", T),
            // brackets are not allowed in property names: edgeHub compiles them to undefined
            ("$sys1[0]", U),
            ("{$sys1[0]}", U),
            ("$", U),
            // $body paths
            ("$body.temp", n(50.0)),
            ("$BODY.temp = 50", T),
            ("$bODy.temp <= 50", T),
            ("$body.temp = 40 + 10", T),
            ("$body.neg", n(-50.4)),
            ("$body.street", s("One Microsoft Way")),
            ("$body.flag", T),
            ("$body.off", F),
            ("$body.nothing", N),
            ("$body.list[0]", n(20.0)),
            ("$body.list[2] = 40", T),
            ("$body.list[3]", N),
            ("$body.list[0] + $body.list[1]", n(50.0)),
            ("$body.list[1] * $body.list[2] = 1200", T),
            ("$body.nested.a.b[1].c", n(2.0)),
            ("$body.nested.m[0][1]", n(2.0)),
            ("$body.Weather.Temperature", n(50.0)),
            ("$body.weather.temperature", N),
            ("$body.$.temp", n(50.0)),
            ("$body.$x", s("dollar")),
            ("$body.single.*", n(7.0)),
            ("$body.list[0]x", U),
            ("$body.temp]", U),
            // objects, arrays and dates are undefined; a missing path is null
            ("$body.list", U),
            ("$body.nested", U),
            ("$body.$", U),
            ("$body.time", U),
            ("$body.time <> '100'", U),
            ("$body.day", s("2017-03-09")),
            ("$body.missing", N),
            ("$body.missing = null", T),
            ("$body.missing.deeper = null", T),
            ("$body.temp.deeper", N),
            ("$body.missing <> '100'", T),
            ("NOT ($body.missing != null)", T),
            ("$body", U),
            // body values compare across types by QueryValue's type order
            ("$body.temp = '50'", F),
            ("$body.temp <> '50'", T),
            ("$body.temp < 'a'", T),
            ("$body.temp != null", T),
            ("$body.temp > true", T),
            ("$body.state = 'WA'", T),
            ("$body.state = $body.street", F),
            ("$body.state <> $body.street", T),
            ("$body.flag = true", T),
            ("key1 = $body.missing", F),
            ("none = $body.state", U),
            // `$body.x` yields to an application property of that exact name; `{$body.x}` does not
            ("$body.shadowed", s("100")),
            ("$body.shadowed = '100'", T),
            ("as_number($body.shadowed) = 100", T),
            ("{$body.shadowed} = 50", T),
            // body-query logic: both sides must be booleans
            ("$body.flag AND $body.flag", T),
            ("$body.flag OR $body.off", T),
            ("$body.off OR NOT($body.off)", T),
            ("NOT $body.off", T),
            ("NOT $body.temp", U),
            ("$body.off AND undefined", U),
            ("$body.flag AND key1", U),
            ("$body.flag OR null", U),
            ("$body.temp / 0", n(f64::INFINITY)),
            ("$body.zero / $body.zero", U),
            ("is_defined($body.zero / $body.zero)", T),
        ];
        let count = check(&cases, &msg());
        assert!(count > 0);
    }

    #[test]
    fn body_needs_json() {
        let cases = [
            ("$body.temp", U),
            ("$body.temp = 50", U),
            ("$body.missing", U),
            ("is_defined($body.temp)", F),
            ("$body.shadowed", s("100")),
            ("{$body.shadowed}", U),
            ("$body.temp = 50 OR true", T),
            ("key1 = 'value1'", T),
        ];
        check(&cases, &msg_no_json());
        // A body whose top level is not an object is like no body (JObject.Parse fails).
        let array_body = Msg {
            body: Some(json!([1, 2])),
            ..msg()
        };
        check(&[("$body.$", U), ("$body.missing", U)], &array_body);
    }

    #[test]
    fn functions() {
        let cases = [
            // math
            ("abs(-12)", n(12.0)),
            ("ABS(as_number(key2))", n(3.0)),
            ("abs($body.neg) = 50.4", T),
            ("is_defined(abs(as_number(key1)))", F),
            ("exp(0)", n(1.0)),
            ("abs(exp(1) - 2.718281) < 1e-6", T),
            ("exp(4000) = 3/0", T),
            ("power(2, 3)", n(8.0)),
            ("POWER(10, 4000) = 3/0", T),
            ("power($body.temp, 2)", n(2500.0)),
            ("power(-8, 0.5)", U),
            ("square(3)", n(9.0)),
            ("square($body.temp) = 2500", T),
            ("ceiling(2.1)", n(3.0)),
            ("ceiling(-2.1)", n(-2.0)),
            ("floor(2.1)", n(2.0)),
            ("floor(-2.1)", n(-3.0)),
            ("sign(0)", n(0.0)),
            ("sign(2.1)", n(1.0)),
            ("sign(-2)", n(-1.0)),
            ("sign(-3 / 0)", n(-1.0)),
            ("sign($body.neg)", n(-1.0)),
            ("is_defined(sign(3 % 0))", F),
            ("sqrt(4)", n(2.0)),
            ("SQRT(-4)", U),
            ("is_defined(sqrt(3 / 0))", T),
            // type checks
            ("as_number('3')", n(3.0)),
            ("as_number(key2) * 3 = 9", T),
            ("as_number(key1)", U),
            ("as_number(null_value)", U),
            ("as_number(4)", n(4.0)),
            ("as_number(as_number(4)) * 3", n(12.0)),
            ("as_number('10e10') = 10e10", T),
            ("as_number('10e1000') = 1/0", T),
            ("as_number(' -1,234.5e1 ')", n(-12345.0)),
            ("as_number('(42)')", n(-42.0)),
            ("as_number('42-')", n(-42.0)),
            ("as_number('¤5')", n(5.0)),
            ("as_number('infinity') = 1/0", T),
            ("as_number('NaN')", U),
            ("as_number('0x10')", U),
            ("as_number('- 1')", U),
            ("as_number('')", U),
            ("as_number(temperature) > 25", T),
            ("as_number($body.temp)", n(50.0)),
            ("as_number($body.state)", U),
            ("is_bool(true)", T),
            ("IS_BOOL(false)", T),
            ("is_bool(12.34)", F),
            ("is_bool('x')", F),
            ("is_bool(key1)", F),
            ("is_bool(none)", F),
            ("is_bool(undefined)", F),
            ("is_bool(undefined = undefined)", U),
            ("is_bool($body.flag)", T),
            ("is_bool($body.temp)", F),
            ("is_bool($body.list)", U),
            ("is_defined(undefined)", F),
            ("is_defined(key1)", T),
            ("is_defined(key4)", F),
            ("is_defined(null)", T),
            ("is_defined(null_value)", T),
            ("is_defined(10e1000)", T),
            ("is_defined(3 % 0)", F),
            ("is_defined(undefined and true)", F),
            ("is_defined($body.street)", T),
            ("is_defined($body.missing)", T),
            ("is_defined($body.list)", F),
            ("is_null(null)", T),
            ("is_null(null_value)", T),
            ("is_null(none)", F),
            ("is_null(key1)", F),
            ("is_null(12.34)", F),
            ("is_null(3 / 0)", F),
            ("is_null(true)", F),
            ("is_null($body.nothing)", T),
            // edgeHub's is_null on a body value is `value != <missing>`: true for any value
            ("is_null($body.temp)", T),
            ("is_null($body.missing)", F),
            ("is_null($body.list)", U),
            ("is_number(12.34)", T),
            ("is_number(3 / 0)", F),
            ("is_number(as_number(key2))", T),
            ("is_number(as_number(key1))", F),
            ("is_number('1')", F),
            ("is_number($body.temp)", T),
            ("is_number($body.state)", F),
            ("is_number($body.list)", F),
            ("is_string('x')", T),
            ("is_string(key1)", T),
            ("is_string(null_value)", F),
            ("is_string(none)", F),
            ("is_string(12.34)", F),
            ("is_string('a' || 'b')", T),
            ("is_string($body.street)", T),
            ("is_string($body.temp)", F),
            // strings
            ("concat('a', 'b', 'c', 'd')", s("abcd")),
            ("CONCAT('a', key1, 'd')", s("avalue1d")),
            ("concat('a', null_value, 'd')", s("ad")),
            ("is_defined(concat('a', none, 'd'))", F),
            (
                "concat($body.street, ', ', $body.state) = 'One Microsoft Way, WA'",
                T,
            ),
            ("concat('a', $body.temp)", U),
            ("length('HELLO')", n(5.0)),
            ("LENGTH('')", n(0.0)),
            ("length(key3)", n(6.0)),
            ("length(unicode)", n(8.0)),
            ("length(null_value)", U),
            ("length($body.state)", n(2.0)),
            ("lower('HELLO')", s("hello")),
            ("lower(key3)", s("value3")),
            ("lower('İ')", s("İ")),
            ("upper(key1)", s("VALUE1")),
            ("upper('straße')", s("STRAßE")),
            ("upper('ı')", s("ı")),
            ("lower(none)", U),
            ("upper($body.street)", s("ONE MICROSOFT WAY")),
            ("substring('abc', 1)", s("bc")),
            ("substring('abc', 3)", s("")),
            ("substring('abc', 4)", U),
            ("substring('abc', -1)", U),
            ("substring('abc', 1.9)", s("bc")),
            ("substring('abc', 1 % 0)", U),
            ("substring(key1, 1)", s("alue1")),
            ("substring(null_value, 1)", U),
            ("substring('abc', 1, 1)", s("b")),
            ("substring('abc', 1, 0)", s("")),
            ("substring('abc', 3, 0)", U),
            ("substring('abc', -1, 0)", U),
            ("substring('abc', 1, -2)", U),
            ("substring('abc', 1, 3)", U),
            ("substring('hello', 4, 1)", s("o")),
            ("substring(unicode, 0, 5)", s("Tchüs")),
            (
                "substring($body.street, length($body.street) - 3)",
                s("Way"),
            ),
            ("index_of('abcdef', 'cd')", n(2.0)),
            ("index_of('abc', 'xz')", n(-1.0)),
            ("index_of('abc', '')", n(0.0)),
            ("index_of(unicode, '😀')", n(6.0)),
            ("index_of(none, '1')", U),
            ("index_of($body.street, 'Way') > 6", T),
            ("starts_with('abc', 'ab')", T),
            ("starts_with('abc', 'xz')", F),
            ("STARTS_WITH(key1, 'val')", T),
            ("starts_with(null_value, '1')", U),
            ("ends_with('abc', 'bc')", T),
            ("ends_with('abc', key1)", F),
            ("ends_with($body.street, 'Way')", T),
            ("contains('abc', 'b')", T),
            ("contains('abc', 'xz')", F),
            ("contains(none, '1')", U),
            ("contains($body.street, 'Microsoft')", T),
            ("contains($body.temp, '5')", U),
            // twin_change_includes: no twin body on this message
            ("twin_change_includes(properties.reported.WeatherTwin)", U),
        ];
        check(&cases, &msg());
    }

    #[test]
    fn twin_change_includes_paths() {
        let cases = [
            ("twin_change_includes(properties.reported.WeatherTwin)", T),
            ("TWIN_CHANGE_INCLUDES(properties.reported.WeatherTwin)", T),
            (
                "twin_change_includes(properties.reported.WeatherTwin.Location.City)",
                T,
            ),
            ("twin_change_includes(properties.reported.nul)", T),
            ("twin_change_includes(properties.reported.Other)", F),
            ("twin_change_includes(properties.desired.WeatherTwin)", F),
            ("twin_change_includes(tags.site)", T),
            ("twin_change_includes(properties.reported.$version)", T),
            (
                "twin_change_includes(properties.reported.WeatherTwin.Location.City) AND \
                 Not(twin_change_includes(properties.reported.WeatherTwin.Temperature123))",
                T,
            ),
            // the argument is the tokens' text: spaces around `-` vanish
            ("twin_change_includes(properties.reported.a - b)", F),
        ];
        check(&cases, &msg_twin());
        let c = Condition::parse("twin_change_includes(properties.reported.x)").unwrap();
        assert!(c.uses_twin_change());
        assert!(!c.uses_body());
    }

    #[test]
    fn invalid_conditions() {
        let cases = [
            "",
            "   ",
            "/* only a comment */",
            // unbalanced parentheses
            "(true",
            "((true)",
            "true)",
            "(true))",
            "abs(1",
            "abs(1))",
            "()",
            // unknown function, wrong arity, wrong argument types
            "foo(1)",
            "is_defined()",
            "is_defined(1, 2)",
            "abs(3, 4)",
            "power(2)",
            "concat()",
            "concat('a')",
            "concat(3, 'a')",
            "substring('hello')",
            "substring('a', 'b')",
            "substring(1, 2, 3, 4)",
            "index_of('hello', 'a', 'b')",
            "starts_with('a', 1)",
            "length(12.34)",
            "lower(null)",
            "upper(undefined)",
            "abs(null)",
            "abs(key1)",
            "sqrt(true)",
            "as_number(true)",
            "as_number(null)",
            "twin_change_includes()",
            "twin_change_includes(      )",
            "twin_change_includes('properties.reported.x')",
            "twin_change_includes(properties.)",
            "twin_change_includes(123123)",
            "twin_change_includes(properties.abcd123)",
            "twin_change_includes(properties.desired.twin,,,,,)",
            "twin_change_includes(properties[0])",
            // bad tokens
            "@32 = 32",
            "32 = [32]",
            "(@)",
            "a ; b",
            "a : b",
            "a ? b",
            "test == true",
            "key1 = 'x' \\",
            "select",
            "a = 1 INTO",
            "WHERE true",
            // unterminated string or comment, bad escapes
            "none = \"",
            "'abc",
            "\"unterminated = 'unterminated'",
            r"'bad \n escape'",
            r"'\u12'",
            "true /* open",
            // syntax
            "true false",
            "3 4",
            "a = 1 b",
            "a -1",
            "1 +",
            "AND true",
            "true AND",
            "NOT",
            "-",
            "{key1}",
            "{$sys1",
            "{}",
            "abs(,1)",
            "abs(1,)",
            // type errors
            "is_defined(3 + none)",
            "is_defined(3 + null_value)",
            "is_defined(true + 3)",
            "is_defined('a' + 'b')",
            "is_defined(undefined + 3)",
            "is_defined(3 % undefined)",
            "is_defined(3 = none)",
            "is_defined(3 < null_value)",
            "temperature > 20",
            "key1 ?? \"hello\" = \"value1\"",
            "(key1 ?? 12.34)",
            "(as_number(key2) ?? key1)",
            "(key1 ?? null)",
            "(key1 ?? true)",
            "'a' || null",
            "'a' || undefined",
            "'a' || true",
            "none and true",
            "undefined and \"hello\"",
            "none or true",
            "null and undefined",
            "undefined or null",
            "- (key1)",
            "-undefined + 1",
            "- undefined",
            "is_defined(not key1)",
            "NOT undefined",
            "1 = undefined",
            "null = false",
            "$body.temp = undefined",
            // body-query specifics edgeHub cannot compile
            "- $body.temp",
            "undefined ?? 'x'",
            "$body.list[*]",
            "$body.list[-1]",
            "$body.temp + key2",
            "$body.temp % 2",
            "true AND $body.flag",
            "$body.flag AND null",
            "$body.",
            "$body.a..b",
            "$body.a.",
            "$body.a[]",
            "$body.a[x]",
            "$body.a[0",
            "$body.a.0",
            "$body.[0]",
            "$body;@",
        ];
        let mut accepted = Vec::new();
        for text in cases {
            if let Ok(c) = Condition::parse(text) {
                accepted.push(format!("{text:?} => {c:?}"));
            }
        }
        assert!(accepted.is_empty(), "\n{}", accepted.join("\n"));
    }

    #[test]
    fn error_positions() {
        let cases = [
            ("", 0, "empty condition"),
            ("@32 = 32", 0, "invalid symbol '@'"),
            ("a = 'x' AND", 11, "ends where an expression is expected"),
            ("1 + 'x'", 2, "invalid operands to binary operator '+'"),
            ("key1 and true", 5, "'and'"),
            ("(a = 'b'", 0, "missing closing ')'"),
            ("a = 'b')", 7, "unmatched closing ')'"),
            ("true   foo(1)", 7, "unexpected 'foo'"),
            ("  foo(1)", 2, "invalid built-in function 'foo'"),
            ("abs('x')", 0, "abs(string)"),
            ("a = \"open", 4, "unterminated string"),
            ("é = ü;", 7, "invalid symbol ';'"),
            ("$body.a[] = 1", 0, "invalid $body query"),
        ];
        for (text, position, fragment) in cases {
            let e = Condition::parse(text).unwrap_err();
            assert_eq!(e.position, position, "{text:?}: {e}");
            assert!(e.message.contains(fragment), "{text:?}: {e}");
        }
        let e = Condition::parse("1 + 'x'").unwrap_err();
        assert_eq!(
            e.to_string(),
            "at position 2: invalid operands to binary operator '+': have 'number' and 'string'"
        );
    }

    #[test]
    fn uses_body_and_debug() {
        assert!(Condition::parse("$body.temp > 1").unwrap().uses_body());
        assert!(Condition::parse("$body.shadowed = '1'")
            .unwrap()
            .uses_body());
        assert!(Condition::parse("{$BODY.x} = 1").unwrap().uses_body());
        assert!(!Condition::parse("$sys1 = 'x'").unwrap().uses_body());
        assert!(!Condition::parse("$bodyx = 'x'").unwrap().uses_body());
        // `-$body.x` without a space is an application property named `-$body.x`
        assert!(!Condition::parse("-$body.x = 'y'").unwrap().uses_body());
        let c = Condition::parse("true").unwrap();
        assert_eq!(format!("{c:?}"), "Condition(\"true\")");
        assert_eq!(c.as_str(), "true");
        let c2 = c.clone();
        assert!(c2.matches(&msg()));
        assert!(!Condition::parse("'x'").unwrap().matches(&msg()));
        assert!(!Condition::parse("null").unwrap().matches(&msg()));
        assert!(!Condition::parse("$body.temp").unwrap().matches(&msg()));
        assert!(Condition::parse("$body.flag").unwrap().matches(&msg()));
    }

    #[test]
    fn leaf_device_idiom() {
        let c = Condition::parse("NOT is_defined($connectionModuleId)").unwrap();
        assert!(!c.matches(&msg()));
        let leaf = Msg {
            sys: vec![("connectionDeviceId", s("leaf"))],
            ..msg()
        };
        assert!(c.matches(&leaf));
    }

    #[test]
    fn newtonsoft_dates() {
        for date in [
            "2017-03-09T00:00:00.000Z",
            "2017-03-09T00:00:00",
            "2017-03-09T23:59:59.1234567+01:00",
            "2017-03-09T23:59:59-0130",
            "2016-02-29T24:00:00Z",
            "/Date(1234567890)/",
            "/Date(-1234567890+0100)/",
        ] {
            assert!(is_newtonsoft_date(date), "{date}");
        }
        for not_date in [
            "2017-03-09",
            "2017-02-29T00:00:00",
            "2017-13-09T00:00:00",
            "2017-03-09T24:00:01",
            "2017-03-09T00:00:00.",
            "2017-03-09 00:00:00",
            "2017-03-09T00:00:00Zx",
            "/Date()/",
            "/Date(abc)/",
            "x2017-03-09T00:00:00",
            "",
        ] {
            assert!(!is_newtonsoft_date(not_date), "{not_date}");
        }
    }

    #[test]
    fn dotnet_number_parsing() {
        let cases: [(&str, Option<f64>); 16] = [
            ("3", Some(3.0)),
            ("  3  ", Some(3.0)),
            ("+3", Some(3.0)),
            ("1,000", Some(1000.0)),
            (",5", None),
            ("1.", Some(1.0)),
            (".5", Some(0.5)),
            ("1e", None),
            ("1e-2", Some(0.01)),
            ("1E+2", Some(100.0)),
            ("(3)", Some(-3.0)),
            ("(3", None),
            ("3\0\0", Some(3.0)),
            ("-Infinity", Some(f64::NEG_INFINITY)),
            ("1e99999", Some(f64::INFINITY)),
            ("abc", None),
        ];
        for (text, want) in cases {
            assert_eq!(dotnet_parse_double(text), want, "{text:?}");
        }
        assert!(dotnet_parse_double("-nan").is_some_and(f64::is_nan));
    }

    #[test]
    fn nesting_is_bounded() {
        let deep = format!("{}1{}", "(".repeat(10_000), ")".repeat(10_000));
        assert!(Condition::parse(&deep).is_err());
        let nots = format!("{}true", "NOT ".repeat(10_000));
        assert!(Condition::parse(&nots).is_err());
        let calls = format!("{}1{}", "abs(".repeat(10_000), ")".repeat(10_000));
        assert!(Condition::parse(&calls).is_err());
        let chain = format!("1{}", " + 1".repeat(10_000));
        assert!(Condition::parse(&chain).is_err());
        // Within the limits everything works.
        let ok = format!("{}1{}", "(".repeat(MAX_NESTING), ")".repeat(MAX_NESTING));
        assert_eq!(Condition::parse(&ok).unwrap().evaluate(&msg()), n(1.0));
        let ok = format!("true{}", " AND true".repeat(MAX_DEPTH - 1));
        assert!(Condition::parse(&ok).unwrap().matches(&msg()));
        let wide = format!("concat('a'{})", ", 'b'".repeat(10_000));
        let c = Condition::parse(&wide).unwrap();
        assert_eq!(c.evaluate(&msg()), s(&format!("a{}", "b".repeat(10_000))));
    }

    /// Random conditions from fragments of the language: parsing and evaluating must never
    /// panic.
    #[test]
    fn fuzz_never_panics() {
        const PARTS: &[&str] = &[
            "(",
            ")",
            "'",
            "\"",
            "\\",
            "\\u",
            "$body.",
            "$",
            "[",
            "]",
            "0",
            "1",
            "9",
            ".",
            "e",
            "x",
            "-",
            "+",
            "*",
            "/",
            "%",
            " ",
            "AND ",
            "or ",
            "NOT ",
            "??",
            "||",
            "=",
            "<",
            ">",
            "!",
            "{",
            "}",
            "/*",
            "*/",
            ",",
            "ü",
            "😀",
            "abs(",
            "concat(",
            "substring(",
            "twin_change_includes(",
            "properties.reported.",
            "is_null(",
            "as_number(",
            "key1",
            "$sys1",
            "null",
            "true",
            "undefined",
            "0x",
            "[0]",
            "list",
            "temp",
            "time",
            "@",
            ";",
            "\t",
            "\n",
            "?",
            "&",
            "|",
        ];
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let (m, t) = (msg(), msg_twin());
        let mut parsed = Vec::new();
        for _ in 0..30_000 {
            let len = (next() % 12) as usize;
            let text: String = (0..len)
                .map(|_| PARTS[(next() % PARTS.len() as u64) as usize])
                .collect();
            if let Ok(c) = Condition::parse(&text) {
                let _ = c.evaluate(&m);
                let _ = c.matches(&t);
                parsed.push(c);
            }
        }
        assert!(
            parsed.len() > 100,
            "only {} random conditions parsed",
            parsed.len()
        );
        let set = ConditionSet::new(&parsed.iter().collect::<Vec<_>>());
        let view = WithText::new(&m);
        let slots = set.slots(&view);
        for (i, c) in parsed.iter().enumerate() {
            assert_eq!(set.evaluate(i, &slots), c.evaluate(&m), "{c:?}");
        }
    }

    /// Records what conditions ask a message for.
    struct Counting<'a> {
        view: WithText<'a>,
        asked: std::cell::RefCell<Vec<String>>,
    }

    impl Counting<'_> {
        fn asked(&self, what: String) {
            self.asked.borrow_mut().push(what);
        }
    }

    impl MessageView for Counting<'_> {
        fn app_property(&self, name: &str) -> Option<Value> {
            self.asked(format!("app {name}"));
            self.view.app_property(name)
        }
        fn system_property(&self, name: &str) -> Option<Value> {
            self.asked(format!("system {name}"));
            self.view.system_property(name)
        }
        fn body_json(&self) -> Option<&serde_json::Value> {
            self.asked("body_json".to_owned());
            self.view.body_json()
        }
        fn twin_change(&self) -> Option<&serde_json::Value> {
            self.asked("twin_change".to_owned());
            self.view.twin_change()
        }
        fn body_text(&self) -> Option<&str> {
            self.asked("body_text".to_owned());
            self.view.body_text()
        }
    }

    fn set_of(texts: &[&str]) -> (ConditionSet, Vec<Condition>) {
        let conditions: Vec<Condition> = texts
            .iter()
            .map(|t| Condition::parse(t).unwrap_or_else(|e| panic!("{t}: {e}")))
            .collect();
        let set = ConditionSet::new(&conditions.iter().collect::<Vec<_>>());
        (set, conditions)
    }

    #[test]
    fn a_set_looks_each_name_up_once_ignoring_case() {
        let (set, _) = set_of(&[
            "key1 = 'value1'",
            "KEY1 = 'x' OR Key1 <> 'y'",
            // `$key1` reads the application property `$key1`, then the system property.
            "$key1 = 'value1'",
            "{$KEY1} = 'z'",
            "$body.temp > 1",
            "$BODY.temp < 100",
            // Body member names are case-sensitive: there is `temp`, not `Temp`.
            "$body.Temp = 50",
            "$body.list[0] = 20 AND {$body.list[0]} = 20",
        ]);
        // key1; $key1 and system key1; the application property $body.temp (any case) and the
        // body paths temp and Temp; list[0], which has brackets, so it is only a body path.
        assert_eq!(set.lookups(), 7);

        let m = msg();
        let counting = Counting {
            view: WithText::new(&m),
            asked: Default::default(),
        };
        let slots = set.slots(&counting);
        let results: Vec<Value> = (0..8).map(|i| set.evaluate(i, &slots)).collect();
        assert_eq!(results, [T, T, U, U, T, T, F, T]);
        let mut asked = counting.asked.take();
        asked.sort();
        assert_eq!(
            asked,
            [
                "app $body.temp",
                "app $key1",
                "app key1",
                "body_text",
                "system key1",
            ],
            "each lookup once; every body path from one pass over the text"
        );
    }

    #[test]
    fn dollar_names_and_escaped_names_in_a_set() {
        let m = Msg {
            app: vec![
                ("$connectionModuleId", s("from-app")),
                ("$body.temp", s("shadow")),
            ],
            ..msg()
        };
        let texts = [
            "$connectionModuleId = 'from-app'",
            "{$connectionModuleId} = 'mod1'",
            "$connectionDeviceId = 'dev1'",
            "{$connectionDeviceId} = 'dev1'",
            "$body.temp = 'shadow'",
            "{$body.temp} = 50",
            "$body.temp = 50",
        ];
        let (set, conditions) = set_of(&texts);
        let with_text = WithText::new(&m);
        for view in [&m as &dyn MessageView, &with_text] {
            let slots = set.slots(view);
            for (i, c) in conditions.iter().enumerate() {
                let want = if i == 6 { F } else { T };
                assert_eq!(c.evaluate(view), want, "{}", texts[i]);
                assert_eq!(set.evaluate(i, &slots), want, "{} in a set", texts[i]);
            }
        }
    }

    #[test]
    fn repeated_tests_are_shared() {
        let (set, _) = set_of(&[
            "$connectionModuleId = 'mod1' AND as_number(key2) % 2 = 1",
            "$connectionModuleId = 'mod1' AND as_number(key2) % 3 = 0",
            "$connectionModuleId = 'mod1' AND as_number(key2) % 3 = 0",
            // Strings are not shared (a shared value borrows nothing); constants need not be.
            "lower(key3) = 'value3' AND 1 + 1 = 2",
            "lower(key3) = 'value3' AND 1 + 1 = 2 OR false",
        ]);
        // The module test, as_number(key2), the second condition (used twice) and the
        // `lower(...)` comparison: not `... % 2 = 1` (used once), and nothing inside the
        // second condition is counted twice for it being used twice.
        assert_eq!(set.shared(), 4);
        let m = msg();
        let slots = set.slots(&m);
        let results: Vec<Value> = (0..5).map(|i| set.evaluate(i, &slots)).collect();
        assert_eq!(results, [T, T, T, T, T]);
    }

    /// A body path as the run time reads it (negative indexes get there only in trailing
    /// text the grammar ignores, so they are made directly).
    fn body_path(query: &str) -> Lookup {
        let steps = newtonsoft_steps(query);
        assert!(steps.is_some(), "{query}");
        Lookup::Body(JsonPath { steps })
    }

    /// The one-pass reader against `body_query` on the parsed document, for every path.
    fn compare_body_reads(documents: &[&str], queries: &[&str]) {
        let lookups: Vec<Lookup> = queries.iter().map(|q| body_path(q)).collect();
        let paths = BodyPaths::new(&lookups);
        assert_eq!(paths.slots.len(), queries.len(), "all paths are plain");
        for text in documents {
            let m = Msg {
                body: serde_json::from_str(text).ok(),
                ..msg()
            };
            let read = paths.read(text);
            for (k, &slot) in paths.slots.iter().enumerate() {
                let Lookup::Body(path) = &lookups[slot] else {
                    unreachable!()
                };
                let want = format!("{:?}", body_query(path, &m));
                let got = format!("{:?}", read[k]);
                assert_eq!(got, want, "{} in {text}", queries[slot]);
            }
        }
    }

    #[test]
    fn body_paths_read_in_one_pass_select_what_the_document_does() {
        let queries = [
            "a", "a.b", "a.b.c", "a[0]", "a[1].b", "a[-1]", "a[-1].b", "list[2]", "list[5]", "s",
            "esc", "date", "n", "big", "neg", "x.y", "kv", "é",
        ];
        let documents = [
            r#"{"a": 1, "list": [1, 2, 3], "s": "text", "n": null}"#,
            r#"{"a": {"b": {"c": true}}, "a": {"b": 2}}"#,
            r#"{"a": {"b": 1}, "a": [5, {"b": "x"}]}"#,
            r#"{"a": [5, {"b": "x"}], "a": {"b": 1}}"#,
            r#"{"a": [], "list": {"2": 7}, "x": {"y": [1]}}"#,
            r#"{"esc": "tab\there \"q\" \u00e9", "date": "2017-03-09T00:00:00Z", "é": 1}"#,
            r#"{"big": 18446744073709551615, "neg": -0, "n": 1.5e3, "s": 12345678901234567890}"#,
            r#"{"a": {"b": {"c": [1, {"d": 2}]}}, "x": {"y": {"z": 1}}, "s": "/Date(0)/"}"#,
            r#"{"k\u0076": "escaped name", "a": [[1], [2]], "kv": 2}"#,
            // Not an object, or not JSON: every body query is undefined.
            r#"[1, 2]"#,
            r#""a""#,
            r#"3"#,
            r#"null"#,
            r#""#,
            r#"{"a": 1,}"#,
            r#"{"a": 1} x"#,
            r#"{"a": 1, "z": 1e400}"#,
            r#"{"a": 1, "z": "\ud800"}"#,
            r#"{"a": 1, "z": "\x"}"#,
            r#"{"a": 1, "z": [1 2]}"#,
            r#"{"a": 1, "z": -}"#,
        ];
        compare_body_reads(&documents, &queries);
        // Nesting deeper than the parser allows fails the whole document, read or skipped.
        let deep = format!(
            r#"{{"a": 1, "z": {}1{}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        let shallow = format!(
            r#"{{"a": 1, "z": {}1{}}}"#,
            "[".repeat(100),
            "]".repeat(100)
        );
        compare_body_reads(&[&deep, &shallow], &["a", "z[0][0]"]);
    }

    /// A random JSON value as text, with repeated and escaped member names.
    fn random_json(next: &mut dyn FnMut() -> u64, depth: u32) -> String {
        const NAMES: [&str; 4] = ["a", "b", "c", "\\u0061"];
        const SCALARS: [&str; 8] = [
            "1",
            "-2.5",
            "true",
            "null",
            "\"x\"",
            "\"a\\nb\"",
            "0",
            "1e2",
        ];
        let kinds = if depth > 3 { 1 } else { 3 };
        match next() % kinds {
            0 => SCALARS[(next() % 8) as usize].to_owned(),
            1 => {
                let items: Vec<String> = (0..next() % 4)
                    .map(|_| random_json(next, depth + 1))
                    .collect();
                format!("[{}]", items.join(","))
            }
            _ => {
                let members: Vec<String> = (0..next() % 4)
                    .map(|_| {
                        let name = NAMES[(next() % 4) as usize];
                        format!("\"{name}\":{}", random_json(next, depth + 1))
                    })
                    .collect();
                format!("{{{}}}", members.join(","))
            }
        }
    }

    #[test]
    fn body_paths_read_in_one_pass_agree_on_random_documents() {
        let mut state: u64 = 0x2545_F491_4F6C_DD1D;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let queries = [
            "a", "b", "a.a", "a.b", "a[0]", "a[1]", "b[0].a", "a.a.a", "a[0][0]", "c[-1]", "c[0].b",
        ];
        let documents: Vec<String> = (0..2_000)
            .map(|i| {
                let v = random_json(&mut next, 0);
                // Mostly objects at the top, as bodies are.
                if i % 10 == 0 || v.starts_with('{') {
                    v
                } else {
                    format!("{{\"a\":{v},\"b\":{v},\"c\":[{v}]}}")
                }
            })
            .collect();
        let documents: Vec<&str> = documents.iter().map(String::as_str).collect();
        compare_body_reads(&documents, &queries);
    }
}
