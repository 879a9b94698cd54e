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
use std::collections::HashMap;
use std::fmt;

mod compile;
mod eval;
mod functions;
mod json;
mod lexer;
mod parser;
#[cfg(test)]
mod tests;

use compile::*;
use eval::*;
use functions::*;
use json::*;
use lexer::*;
use parser::*;

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
