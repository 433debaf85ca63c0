//! Source text helpers: slices, line numbers, name scans and re-indentation.

use ruff_python_ast::visitor::{self, Visitor};
use ruff_python_ast::{Expr, ExprContext, Stmt};
use ruff_text_size::{Ranged, TextRange};

use crate::refusal::{ReasonCode as R, Refusal};

/// The analysed text with a line index.
pub(crate) struct Source<'a> {
    pub text: &'a str,
    line_starts: Vec<usize>,
}

impl<'a> Source<'a> {
    pub fn new(text: &'a str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Self { text, line_starts }
    }

    /// The source text of a node.
    pub fn slice(&self, node: &impl Ranged) -> &'a str {
        self.range(node.range())
    }

    pub fn range(&self, range: TextRange) -> &'a str {
        &self.text[range.start().to_usize()..range.end().to_usize()]
    }

    /// 1-based line of a byte offset.
    pub fn line_of(&self, offset: usize) -> usize {
        self.line_starts.partition_point(|&s| s <= offset)
    }

    pub fn line(&self, node: &impl Ranged) -> usize {
        self.line_of(node.range().start().to_usize())
    }

    /// Byte offset of the start of the line holding `offset`.
    pub fn line_start(&self, offset: usize) -> usize {
        self.line_starts[self.line_of(offset) - 1]
    }

    /// Byte offset just past the newline ending the line that holds `offset` (or the text's end).
    pub fn line_end(&self, offset: usize) -> usize {
        let line = self.line_of(offset);
        self.line_starts
            .get(line)
            .copied()
            .unwrap_or(self.text.len())
    }

    /// The whitespace before a statement on its line.
    pub fn indent_of(&self, node: &impl Ranged) -> &'a str {
        let start = node.range().start().to_usize();
        &self.text[self.line_start(start)..start]
    }
}

/// Whether `expr` reads (loads) the name `name` anywhere, including inside lambdas and comprehensions.
pub(crate) fn expr_reads(expr: &Expr, name: &str) -> bool {
    let mut v = NameScan {
        name,
        load: false,
        store: false,
    };
    v.visit_expr(expr);
    v.load
}

/// Whether `stmt` reads the name `name`.
pub(crate) fn stmt_reads(stmt: &Stmt, name: &str) -> bool {
    let mut v = NameScan {
        name,
        load: false,
        store: false,
    };
    v.visit_stmt(stmt);
    v.load
}

/// Whether `stmt` binds (stores or deletes) the name `name`, walrus targets included.
pub(crate) fn stmt_binds(stmt: &Stmt, name: &str) -> bool {
    let mut v = NameScan {
        name,
        load: false,
        store: false,
    };
    v.visit_stmt(stmt);
    v.store
}

struct NameScan<'n> {
    name: &'n str,
    load: bool,
    store: bool,
}

impl<'a> Visitor<'a> for NameScan<'_> {
    fn visit_expr(&mut self, expr: &'a Expr) {
        if let Expr::Name(n) = expr
            && n.id.as_str() == self.name
        {
            match n.ctx {
                ExprContext::Load | ExprContext::Invalid => self.load = true,
                ExprContext::Store | ExprContext::Del => self.store = true,
            }
        }
        visitor::walk_expr(self, expr);
    }
}

/// Whether any string literal inside `stmt` spans several lines (re-indenting it would change its value).
pub(crate) fn has_multiline_string(src: &Source<'_>, stmt: &Stmt) -> bool {
    struct Scan<'s, 't> {
        src: &'s Source<'t>,
        found: bool,
    }
    impl<'a> Visitor<'a> for Scan<'_, '_> {
        fn visit_expr(&mut self, expr: &'a Expr) {
            let is_string = matches!(
                expr,
                Expr::StringLiteral(_)
                    | Expr::BytesLiteral(_)
                    | Expr::FString(_)
                    | Expr::TString(_)
            );
            if is_string && self.src.slice(expr).contains('\n') {
                self.found = true;
            }
            visitor::walk_expr(self, expr);
        }
    }
    let mut scan = Scan { src, found: false };
    scan.visit_stmt(stmt);
    scan.found
}

/// Re-indents a slice that starts at a statement's first character: the first line gets `indent`, every
/// following non-blank line gets `extra` prepended to whatever indentation it had.
pub(crate) fn reindent(text: &str, indent: &str, extra: &str) -> String {
    let mut out = String::with_capacity(text.len() + 64);
    for (i, line) in text.split('\n').enumerate() {
        if i == 0 {
            out.push_str(indent);
        } else {
            out.push('\n');
            if !line.trim().is_empty() {
                out.push_str(extra);
            }
        }
        out.push_str(if line.trim().is_empty() && i > 0 {
            ""
        } else {
            line
        });
    }
    out
}

/// Text of an expression, parenthesised when it is not an atom (so it can sit in an argument list).
pub(crate) fn atom_text(src: &Source<'_>, expr: &Expr) -> String {
    let text = src.slice(expr);
    let atomic = matches!(
        expr,
        Expr::Name(_)
            | Expr::Attribute(_)
            | Expr::Call(_)
            | Expr::Subscript(_)
            | Expr::NumberLiteral(_)
            | Expr::NoneLiteral(_)
            | Expr::BooleanLiteral(_)
            | Expr::BinOp(_)
            | Expr::UnaryOp(_)
            | Expr::Compare(_)
            | Expr::BoolOp(_)
    );
    if atomic {
        text.to_string()
    } else {
        format!("({text})")
    }
}

/// Every name a statement binds (assignment targets, walrus targets, loop variables, imports excluded).
pub(crate) fn bound_names(stmt: &Stmt) -> Vec<String> {
    struct Collect(Vec<String>);
    impl<'a> Visitor<'a> for Collect {
        fn visit_expr(&mut self, expr: &'a Expr) {
            if let Expr::Name(n) = expr
                && matches!(n.ctx, ExprContext::Store | ExprContext::Del)
                && !self.0.iter().any(|s| s == n.id.as_str())
            {
                self.0.push(n.id.to_string());
            }
            visitor::walk_expr(self, expr);
        }
    }
    let mut c = Collect(Vec::new());
    c.visit_stmt(stmt);
    c.0
}

/// Whether an expression contains a call (used to decide whether it may be evaluated twice).
pub(crate) fn has_call(expr: &Expr) -> bool {
    struct Scan(bool);
    impl<'a> Visitor<'a> for Scan {
        fn visit_expr(&mut self, expr: &'a Expr) {
            if matches!(expr, Expr::Call(_)) {
                self.0 = true;
            }
            visitor::walk_expr(self, expr);
        }
    }
    let mut s = Scan(false);
    s.visit_expr(expr);
    s.0
}

/// Dotted text of a `Name`/`Attribute` chain (`torch.nn.functional.tanh`), if the expression is one.
pub(crate) fn dotted(expr: &Expr) -> Option<String> {
    match expr {
        Expr::Name(n) => Some(n.id.to_string()),
        Expr::Attribute(a) => dotted(&a.value).map(|base| format!("{base}.{}", a.attr.id)),
        _ => None,
    }
}

/// Parses `source` and hands its first `def` to `f`: the entry point of both `rewrite_forward` and
/// `split_head_forward`.
pub(crate) fn with_first_function<T>(
    source: &str,
    f: impl FnOnce(&Source<'_>, &ruff_python_ast::StmtFunctionDef) -> Result<T, Refusal>,
) -> Result<T, Refusal> {
    let src = Source::new(source);
    let parsed = ruff_python_parser::parse_module(source).map_err(|e| {
        Refusal::new(
            R::ParseError,
            src.line_of(e.location.start().to_usize()),
            e.error.to_string(),
        )
    })?;
    let func = parsed
        .syntax()
        .body
        .iter()
        .find_map(|s| match s {
            Stmt::FunctionDef(f) => Some(f),
            _ => None,
        })
        .ok_or_else(|| Refusal::new(R::NoForward, 0, "the source holds no function definition"))?;
    f(&src, func)
}

/// Refuses emitted code that does not parse. A method still indented inside its class (the audit) is checked
/// inside a one-level block.
pub(crate) fn check_reparse(emitted: &str, what: &str) -> Result<(), Refusal> {
    let reparse = if emitted.starts_with(' ') {
        ruff_python_parser::parse_module(&format!("if True:\n{emitted}"))
    } else {
        ruff_python_parser::parse_module(emitted)
    };
    reparse.map(drop).map_err(|e| {
        Refusal::new(
            R::ReparseFailed,
            0,
            format!("{what} does not parse: {}", e.error),
        )
    })
}

/// Whether `expr` is exactly the name `name`.
pub(crate) fn is_name(expr: &Expr, name: &str) -> bool {
    matches!(expr, Expr::Name(n) if n.id.as_str() == name)
}

/// A refusal located at `node`.
pub(crate) fn refuse(
    code: R,
    src: &Source<'_>,
    node: &impl Ranged,
    message: impl Into<String>,
) -> Refusal {
    Refusal::new(code, src.line(node), message)
}

/// `<name> = <value>` or `<name>: T = <value>` with a single plain-name target.
pub(crate) fn simple_assign(stmt: &Stmt) -> Option<(&str, &Expr)> {
    match stmt {
        Stmt::Assign(a) => match a.targets.as_slice() {
            [Expr::Name(n)] => Some((n.id.as_str(), &a.value)),
            _ => None,
        },
        Stmt::AnnAssign(a) => match (a.target.as_ref(), a.value.as_deref()) {
            (Expr::Name(n), Some(v)) => Some((n.id.as_str(), v)),
            _ => None,
        },
        _ => None,
    }
}

/// Whether `stmt` changes `name`'s tensor in place: `name[...] = `, `name += `, `name.op_(...)`.
pub(crate) fn mutates_in_place(stmt: &Stmt, name: &str) -> bool {
    let root_is = |e: &Expr| match e {
        Expr::Subscript(s) => is_name(&s.value, name),
        Expr::Attribute(a) => is_name(&a.value, name),
        _ => false,
    };
    match stmt {
        Stmt::Assign(a) => a.targets.iter().any(root_is),
        Stmt::AugAssign(a) => is_name(&a.target, name) || root_is(&a.target),
        Stmt::Expr(e) => match e.value.as_ref() {
            Expr::Call(c) => match c.func.as_ref() {
                Expr::Attribute(a) => is_name(&a.value, name) && a.attr.id.as_str().ends_with('_'),
                _ => false,
            },
            _ => false,
        },
        _ => false,
    }
}
