//! The parser: Condition.g4's `expr`, with ANTLR's precedence for its left-recursive alternatives.

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BinOp {
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
    pub(super) fn precedence(self) -> u8 {
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

    pub(super) fn from_tok(tok: &Tok) -> Option<BinOp> {
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
pub(super) enum UnOp {
    Neg,
    Not,
}

#[derive(Debug)]
pub(super) struct Ast {
    pub(super) kind: AstKind,
    /// Byte offset of the token errors about this node point at (operator, function name…).
    pub(super) pos: usize,
    /// The operator as written, for messages.
    pub(super) op_text: String,
    pub(super) depth: usize,
}

#[derive(Debug)]
pub(super) enum AstKind {
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
    pub(super) fn leaf(kind: AstKind, pos: usize) -> Ast {
        Ast {
            kind,
            pos,
            op_text: String::new(),
            depth: 1,
        }
    }

    pub(super) fn node(
        kind: AstKind,
        pos: usize,
        op_text: &str,
        child_depth: usize,
    ) -> PResult<Ast> {
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

pub(super) type PResult<T> = Result<T, ConditionError>;

pub(super) struct Parser<'s> {
    pub(super) src: &'s str,
    pub(super) toks: Vec<Token>,
    pub(super) next: usize,
    pub(super) nesting: usize,
}

impl<'s> Parser<'s> {
    pub(super) fn new(src: &'s str, toks: Vec<Token>) -> Self {
        Parser {
            src,
            toks,
            next: 0,
            nesting: 0,
        }
    }

    pub(super) fn peek(&self) -> Option<&Token> {
        self.toks.get(self.next)
    }

    pub(super) fn bump(&mut self) -> Option<Token> {
        let t = self.toks.get(self.next).cloned();
        if t.is_some() {
            self.next += 1;
        }
        t
    }

    pub(super) fn peek_is(&self, tok: &Tok) -> bool {
        self.peek().is_some_and(|t| &t.tok == tok)
    }

    /// Consumes the next token if it is `tok`.
    pub(super) fn eat(&mut self, tok: &Tok) -> bool {
        let found = self.peek_is(tok);
        if found {
            self.next += 1;
        }
        found
    }

    pub(super) fn text(&self, t: &Token) -> &'s str {
        self.src.get(t.start..t.end).unwrap_or("")
    }

    pub(super) fn enter(&mut self, pos: usize) -> PResult<()> {
        self.nesting += 1;
        if self.nesting > MAX_NESTING {
            return Err(ConditionError::new(
                pos,
                format!("nesting deeper than {MAX_NESTING} levels"),
            ));
        }
        Ok(())
    }

    pub(super) fn leave(&mut self) {
        self.nesting = self.nesting.saturating_sub(1);
    }

    /// The whole text must be one expression. Condition.g4's `condition` rule has no EOF, but
    /// in a route the condition must be followed by INTO, so trailing tokens fail there.
    pub(super) fn parse_condition(mut self) -> PResult<Ast> {
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

    pub(super) fn expr(&mut self, min_prec: u8) -> PResult<Ast> {
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
    pub(super) fn unary(&mut self) -> PResult<Ast> {
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

    pub(super) fn primary(&mut self) -> PResult<Ast> {
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
    pub(super) fn call(&mut self, name: String, pos: usize) -> PResult<Ast> {
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
