//! The compiler: ConditionVisitor's type rules, from the parse tree to a typed expression.

use std::cmp::Ordering;

use super::*;

/// Static types of edgeHub's expression tree: `string`, `double`, `Bool`, `Null`,
/// `Undefined` and `QueryValue` (a body query, typed per message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ty {
    Str,
    Num,
    Bool,
    Null,
    Undef,
    Query,
}

impl Ty {
    pub(super) fn name(self) -> &'static str {
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
    pub(super) fn is_plain(self) -> bool {
        matches!(self, Ty::Str | Ty::Num | Ty::Bool | Ty::Null)
    }

    /// `Args.Match` with QueryValue support: a body query fits any plain parameter type.
    pub(super) fn fits(self, want: Ty) -> bool {
        self == want || self == Ty::Query
    }
}

/// `CheckOperands(op, left.Type, …)` for comparisons and `??`: same types, or a body query
/// against a plain type.
pub(super) fn compatible(a: Ty, b: Ty) -> bool {
    a == b || (b == Ty::Query && a.is_plain()) || (a == Ty::Query && b.is_plain())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Arith {
    Add,
    Sub,
    Mul,
    Div,
    Mod,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Cmp {
    pub(super) fn holds(self, o: Ordering) -> bool {
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
pub(super) enum Math {
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
pub(super) enum Func {
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
    pub(super) fn gives_string(self) -> bool {
        matches!(
            self,
            Func::Concat | Func::Lower | Func::Upper | Func::Substring | Func::SubstringLength
        )
    }
}

pub(super) const TWIN_CHANGE_INCLUDES: &str = "twin_change_includes";

/// One step of a body path, as Newtonsoft's `SelectTokens` runs it.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Step {
    Field(String),
    AnyField,
    Index(i64),
    AnyIndex,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct JsonPath {
    /// None when Newtonsoft would throw while parsing the path at run time, which edgeHub
    /// catches and turns into undefined.
    pub(super) steps: Option<Vec<Step>>,
}

/// What a condition reads from a message. Each distinct lookup has a slot (an index into the
/// condition's or the [`ConditionSet`]'s lookups) and is made at most once per message.
#[derive(Debug, Clone)]
pub(super) enum Lookup {
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
    pub(super) fn same_as(&self, other: &Lookup) -> bool {
        match (self, other) {
            (Lookup::App(a), Lookup::App(b)) | (Lookup::System(a), Lookup::System(b)) => {
                a.eq_ignore_ascii_case(b)
            }
            (Lookup::Body(a), Lookup::Body(b))
            | (Lookup::TwinIncludes(a), Lookup::TwinIncludes(b)) => a == b,
            _ => false,
        }
    }

    pub(super) fn read<'m>(&self, msg: &'m dyn MessageView) -> V<'m> {
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
pub(super) enum Expr {
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
    pub(super) fn children(&self, f: &mut impl FnMut(&Expr)) {
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

    pub(super) fn children_mut(&mut self, f: &mut impl FnMut(&mut Expr)) {
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
    pub(super) fn renumber(&mut self, slots: &[usize]) {
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
    pub(super) fn shareable(&self) -> bool {
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

    pub(super) fn reads_message(&self) -> bool {
        let mut reads = matches!(self, Expr::Lookup(_) | Expr::Shared(_) | Expr::AppOr { .. });
        self.children(&mut |child| reads |= child.reads_message());
        reads
    }

    /// Equal keys for equal expressions: the derived `Debug` text names every field, and
    /// prints each number with the digits that read back as exactly it (`-0.0` too).
    pub(super) fn key(&self) -> String {
        format!("{self:?}")
    }
}

#[derive(Default)]
pub(super) struct Compiler {
    pub(super) lookups: Vec<Lookup>,
    pub(super) uses_body: bool,
    pub(super) uses_twin_change: bool,
}

pub(super) fn operand_error(ast: &Ast, tys: &[Ty]) -> ConditionError {
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
    pub(super) fn slot(&mut self, lookup: Lookup) -> usize {
        intern(&mut self.lookups, &lookup)
    }

    pub(super) fn compile(&mut self, ast: &Ast) -> PResult<(Expr, Ty)> {
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
    pub(super) fn sys_prop(
        &mut self,
        name: &str,
        escaped: bool,
        pos: usize,
    ) -> PResult<(Expr, Ty)> {
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

    pub(super) fn unary(&mut self, ast: &Ast, op: UnOp, operand: &Ast) -> PResult<(Expr, Ty)> {
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

    pub(super) fn binary(&mut self, ast: &Ast, op: BinOp, l: &Ast, r: &Ast) -> PResult<(Expr, Ty)> {
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
    pub(super) fn logic(
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

    pub(super) fn call(
        &mut self,
        name: &str,
        args: &[Ast],
        raw: &str,
        pos: usize,
    ) -> PResult<(Expr, Ty)> {
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
pub(super) const BUILTINS: &[&str] = &[
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

pub(super) fn strip_prefix_ignore_ascii_case<'t>(s: &'t str, prefix: &str) -> Option<&'t str> {
    let head = s.as_bytes().get(..prefix.len())?;
    if head.eq_ignore_ascii_case(prefix.as_bytes()) {
        s.get(prefix.len()..)
    } else {
        None
    }
}
