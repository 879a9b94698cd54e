//! Body and twin paths: JsonPath.g4 validation at compile time, Newtonsoft at run time, and the
//! one-pass reader of the body paths a condition set needs.

use std::borrow::Cow;
use std::fmt;

use super::*;

/// BodyQuery / TwinChangeIncludes: the path must pass JsonPath.g4 (and, for twins, start
/// with a supported prefix); what it selects is decided by Newtonsoft's path parser.
pub(super) fn json_path(query: &str, pos: usize, twin: bool) -> PResult<JsonPath> {
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
pub(super) enum PathTok {
    Dot,
    Open,
    Close,
    Int,
    Ident,
}

pub(super) fn is_path_ident_char(c: char) -> bool {
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
pub(super) fn validate_json_path(q: &str) -> Result<(), &'static str> {
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
pub(super) fn newtonsoft_steps(q: &str) -> Option<Vec<Step>> {
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

pub(super) enum Selected<'a> {
    Nothing,
    One(&'a serde_json::Value),
    Many,
}

/// `SelectTokens(path)` with errors off; None where Newtonsoft throws (a negative index into
/// an array).
pub(super) fn select<'a>(root: &'a serde_json::Value, steps: &[Step]) -> Option<Selected<'a>> {
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
pub(super) fn token_value(v: &serde_json::Value) -> V<'_> {
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
pub(super) struct BodyPaths {
    pub(super) root: PathNode,
    /// The lookup slot of each path, by path number.
    pub(super) slots: Vec<usize>,
}

#[derive(Debug, Clone, Default)]
pub(super) struct PathNode {
    /// The number of the path that ends here.
    pub(super) end: Option<usize>,
    /// Where the paths go on, by name (an object member) or index (an array element).
    pub(super) next: Vec<(Step, PathNode)>,
}

impl BodyPaths {
    pub(super) fn new(lookups: &[Lookup]) -> Self {
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
    pub(super) fn read<'t>(&self, text: &'t str) -> Vec<V<'t>> {
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
    pub(super) fn step(&mut self, step: &Step) -> &mut PathNode {
        let i = match self.next.iter().position(|(s, _)| s == step) {
            Some(i) => i,
            None => {
                self.next.push((step.clone(), PathNode::default()));
                self.next.len() - 1
            }
        };
        &mut self.next[i].1
    }

    pub(super) fn member(&self, name: &str) -> Option<&PathNode> {
        self.next
            .iter()
            .find(|(s, _)| matches!(s, Step::Field(n) if n == name))
            .map(|(_, node)| node)
    }

    pub(super) fn element(&self, index: i64) -> Option<&PathNode> {
        self.next
            .iter()
            .find(|(s, _)| matches!(s, Step::Index(i) if *i == index))
            .map(|(_, node)| node)
    }

    /// Sets the value of every path through this node.
    pub(super) fn fill(&self, values: &mut [V<'_>], value: &V<'static>) {
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
pub(super) struct Reader<'p, 'v, 't> {
    pub(super) node: &'p PathNode,
    pub(super) values: &'v mut [V<'t>],
    /// The document itself: any value but an object makes every body query undefined.
    pub(super) root: bool,
}

impl<'t> Reader<'_, '_, 't> {
    pub(super) fn found(self, value: impl FnOnce() -> V<'t>) {
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
pub(super) struct Member<'p>(pub(super) &'p PathNode);

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
pub(super) struct Skip;

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
pub(super) fn token_string(s: Cow<'_, str>) -> V<'_> {
    if is_newtonsoft_date(&s) {
        V::Undef
    } else {
        V::Str(s)
    }
}
