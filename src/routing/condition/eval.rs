//! Evaluation: three-valued logic over the typed expression, each lookup made at most once.

use std::borrow::Cow;
use std::cell::{Cell, OnceCell};
use std::cmp::Ordering;

use super::*;

/// A run-time value. What it means depends on the static type of the expression that made
/// it: string-typed expressions give `Str`, `NullStr` or `Undef`; numbers give `Num` (never
/// NaN: .NET's NaN double is edgeHub's undefined number) or `Undef`; booleans `Bool` or
/// `Undef`; body queries any of them, including a NaN `Num` and `Missing`.
// A plain tag, as for `Expr`: values are matched at every step.
#[derive(Debug, Clone)]
#[repr(u8)]
pub(super) enum V<'a> {
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
    pub(super) fn into_public(self) -> Value {
        match self {
            V::Undef => Value::Undefined,
            V::NullStr | V::Null | V::Missing => Value::Null,
            V::Bool(b) => Value::Bool(b),
            V::Num(x) if x.is_nan() => Value::Undefined,
            V::Num(x) => Value::Number(x),
            V::Str(s) => Value::String(s.into_owned()),
        }
    }

    pub(super) fn is_undef(&self) -> bool {
        matches!(self, V::Undef)
    }

    /// The same value, borrowing its string instead of copying it.
    pub(super) fn lend(&self) -> V<'_> {
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

    pub(super) fn as_bool(&self) -> Option<bool> {
        match self {
            V::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// QueryValueType order, used when a body query is compared with a value of another
    /// type: None < Bool < Double < String < Null.
    pub(super) fn query_rank(&self) -> u8 {
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
pub(super) fn num<'a>(x: f64) -> V<'a> {
    if x.is_nan() {
        V::Undef
    } else {
        V::Num(x)
    }
}

/// An absent property is undefined.
pub(super) fn property(v: Option<Prop<'_>>) -> V<'_> {
    match v {
        None | Some(Prop::Undefined) => V::Undef,
        Some(Prop::Str(s)) => V::Str(s),
        Some(Prop::NotString) => V::NullStr,
    }
}

/// One message's lookups and shared values, each computed the first time a condition reads
/// it and then reused (strings are lent, not copied).
pub struct Slots<'m> {
    pub(super) reads: &'m Reads,
    pub(super) msg: &'m dyn MessageView,
    /// The lookups' values, then the shared expressions' (booleans, numbers or undefined).
    pub(super) values: Vec<OnceCell<V<'m>>>,
    /// Whether the plain body paths were read yet.
    pub(super) body_read: Cell<bool>,
}

impl<'m> Slots<'m> {
    pub(super) fn new(reads: &'m Reads, msg: &'m dyn MessageView) -> Self {
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
    pub(super) fn lookup(&self, slot: usize) -> V<'_> {
        match self.values.get(slot).and_then(OnceCell::get) {
            Some(value) => value.lend(),
            None => self.first_lookup(slot),
        }
    }

    #[cold]
    pub(super) fn first_lookup(&self, slot: usize) -> V<'_> {
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
    pub(super) fn read_body(&self) {
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
    pub(super) fn shared(&self, slot: usize) -> V<'static> {
        let value = self.values.get(self.reads.lookups.len() + slot);
        match value.and_then(OnceCell::get) {
            Some(value) => scalar(value),
            None => self.first_shared(slot),
        }
    }

    #[cold]
    pub(super) fn first_shared(&self, slot: usize) -> V<'static> {
        let value = self.values.get(self.reads.lookups.len() + slot);
        let (Some(value), Some(e)) = (value, self.reads.shared.get(slot)) else {
            return V::Undef;
        };
        scalar(value.get_or_init(|| scalar(&eval(e, self))))
    }
}

/// A boolean, number or undefined value, which borrows nothing; shared expressions give
/// nothing else (see [`Expr::shareable`]).
pub(super) fn scalar(v: &V<'_>) -> V<'static> {
    match v {
        V::Bool(b) => V::Bool(*b),
        V::Num(x) => V::Num(*x),
        _ => V::Undef,
    }
}

/// [`eval`] with the common leaves (lookups and literals) read in place, saving a call per
/// operand: most comparisons are a lookup against a literal.
#[inline(always)]
pub(super) fn operand<'a>(e: &'a Expr, slots: &'a Slots<'_>) -> V<'a> {
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
pub(super) fn string_equality<'a>(
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
pub(super) fn comparison<'a>(
    op: Cmp,
    kind: Ty,
    l: &'a Expr,
    r: &'a Expr,
    slots: &'a Slots<'_>,
) -> V<'a> {
    compare(op, kind, &operand(l, slots), &operand(r, slots))
}

pub(super) fn eval<'a>(e: &'a Expr, slots: &'a Slots<'_>) -> V<'a> {
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
pub(super) fn body_query<'m>(path: &JsonPath, msg: &'m dyn MessageView) -> V<'m> {
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
pub(super) fn twin_change_includes<'m>(path: &JsonPath, msg: &'m dyn MessageView) -> V<'m> {
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

pub(super) fn arith<'a>(op: Arith, query: bool, a: V<'a>, b: V<'a>) -> V<'a> {
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
pub(super) fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x == y)
}

/// `string.Compare(a, b, StringComparison.Ordinal)`: UTF-16 code units.
pub(super) fn ordinal_cmp(a: &str, b: &str) -> Ordering {
    // Byte order equals UTF-16 order for ASCII (and for all text below U+E000, but not
    // beyond): compare bytes when both are ASCII, code units otherwise.
    if a.is_ascii() && b.is_ascii() {
        a.as_bytes().cmp(b.as_bytes())
    } else {
        a.encode_utf16().cmp(b.encode_utf16())
    }
}

/// `double.CompareTo`: NaN is equal to itself and below everything else.
pub(super) fn dotnet_double_cmp(a: f64, b: f64) -> Ordering {
    match a.partial_cmp(&b) {
        Some(o) => o,
        None if a.is_nan() && b.is_nan() => Ordering::Equal,
        None if a.is_nan() => Ordering::Less,
        None => Ordering::Greater,
    }
}

/// ComparisonOperators.Compare for each static type.
pub(super) fn compare<'a>(op: Cmp, kind: Ty, a: &V<'a>, b: &V<'a>) -> V<'a> {
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
pub(super) fn logic<'a>(
    and: bool,
    kleene: bool,
    l: &'a Expr,
    r: &'a Expr,
    slots: &'a Slots<'_>,
) -> V<'a> {
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

pub(super) fn string_arg<'v>(v: &'v V<'_>) -> Option<&'v str> {
    match v {
        V::Str(s) => Some(s.as_ref()),
        _ => None,
    }
}
