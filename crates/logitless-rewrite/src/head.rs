//! Composite heads: a head module whose `forward` is a straight line of statements ending in one call of a
//! sub-module (BERT's `self.cls` → `predictions` → `decoder`, `RobertaLMHead`'s dense/gelu/norm → `decoder`).
//!
//! Such a head computes `final(prefix(x))`, so the loss can be fused on `final` (when it is an `nn.Linear`)
//! with `prefix(x)` as the hidden states. The prefix is the head's own statements, emitted verbatim in a
//! function that returns the final call's argument instead of calling it: nothing is re-implemented, so the
//! split is exact whenever the forward has this shape. Anything else is refused with a reason.

use ruff_python_ast::visitor::{self, Visitor};
use ruff_python_ast::{Expr, Stmt, StmtFunctionDef};
use ruff_text_size::{Ranged, TextRange, TextSize};

use crate::refusal::{ReasonCode as R, Refusal};
use crate::source::{Source, check_reparse, is_name, with_first_function};

/// How a composite head reduces to its final sub-module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadSplit {
    /// The sub-module the forward ends by calling (`decoder` for `self.decoder(x)`).
    pub final_attr: String,
    /// A `def forward(<the head's parameters>)` running the head's statements up to the final call and
    /// returning that call's argument. It parses.
    pub prefix_source: String,
    /// 1-based line of the final call in the input.
    pub line: usize,
}

/// Splits one (dedented) head `def forward` into prefix + final sub-module call.
pub fn split_head_forward(source: &str) -> Result<HeadSplit, Refusal> {
    with_first_function(source, split_head_function)
}

/// [`split_head_forward`] on a function already parsed from `src`.
pub(crate) fn split_head_function(
    src: &Source<'_>,
    func: &StmtFunctionDef,
) -> Result<HeadSplit, Refusal> {
    let not_understood = |node: &dyn Ranged, why: String| {
        Refusal::new(
            R::HeadNotLinear,
            src.line_of(node.range().start().to_usize()),
            format!("composite head: {why}"),
        )
    };
    if func.is_async {
        return Err(not_understood(func, "its forward is async".into()));
    }
    if let Some(d) = func.decorator_list.first() {
        return Err(not_understood(
            d,
            format!(
                "its forward is decorated with `{}`",
                src.slice(&d.expression)
            ),
        ));
    }
    let params = &func.parameters;
    let Some(me) = params
        .posonlyargs
        .iter()
        .chain(params.args.iter())
        .next()
        .map(|p| p.parameter.name.id.as_str())
    else {
        return Err(not_understood(
            func,
            "its forward takes no `self` parameter".into(),
        ));
    };
    let body = func.body.as_slice();
    let mut final_call: Option<(usize, String, &Expr)> = None;
    if let Some(Stmt::Return(ret)) = body.last() {
        match ret.value.as_deref() {
            Some(Expr::Name(returned)) if body.len() >= 2 => {
                if let Stmt::Assign(assign) = &body[body.len() - 2]
                    && let [target] = assign.targets.as_slice()
                    && is_name(target, returned.id.as_str())
                    && let Some((attr, arg)) = sub_module_call(&assign.value, me)
                {
                    final_call = Some((body.len() - 2, attr, arg));
                }
            }
            Some(value) => {
                if let Some((attr, arg)) = sub_module_call(value, me) {
                    final_call = Some((body.len() - 1, attr, arg));
                }
            }
            None => {}
        }
    }
    let Some((final_idx, final_attr, arg)) = final_call else {
        let at: &dyn Ranged = body
            .last()
            .map_or(func as &dyn Ranged, |s| s as &dyn Ranged);
        return Err(not_understood(
            at,
            format!(
                "its forward does not end by returning `{me}.<module>(x)` (or a name bound to it just before)"
            ),
        ));
    };
    for stmt in &body[..final_idx] {
        let allowed = matches!(stmt, Stmt::Assign(_) | Stmt::AnnAssign(_) | Stmt::Expr(_));
        if !allowed {
            return Err(not_understood(
                stmt,
                format!(
                    "`{}` before the final call (only assignments are understood)",
                    first_line(src.slice(stmt))
                ),
            ));
        }
        if assigns_attribute_of(stmt, me) {
            return Err(not_understood(
                stmt,
                format!("it assigns an attribute of `{me}` in forward"),
            ));
        }
    }
    if body.iter().any(suspends) {
        return Err(not_understood(func, "its forward yields or awaits".into()));
    }
    let func_indent = src.indent_of(func);
    let body_indent = src.indent_of(&body[0]);
    let params_text = src.slice(params.as_ref());
    let mut prefix = format!("{func_indent}def {}{params_text}:\n", func.name.id);
    if final_idx > 0 {
        let start = src.line_start(body[0].range().start().to_usize());
        let end = body[final_idx - 1].range().end();
        prefix.push_str(src.range(TextRange::new(
            TextSize::try_from(start).unwrap_or_default(),
            end,
        )));
        prefix.push('\n');
    }
    prefix.push_str(&format!("{body_indent}return {}\n", src.slice(arg)));
    check_reparse(&prefix, "emitted head prefix")?;
    Ok(HeadSplit {
        final_attr,
        prefix_source: prefix,
        line: src.line(&body[final_idx]),
    })
}

/// `<me>.<attr>(<one positional argument>)`: the attribute and the argument.
fn sub_module_call<'a>(expr: &'a Expr, me: &str) -> Option<(String, &'a Expr)> {
    let Expr::Call(call) = expr else { return None };
    let Expr::Attribute(attr) = call.func.as_ref() else {
        return None;
    };
    if !is_name(&attr.value, me) || !call.arguments.keywords.is_empty() {
        return None;
    }
    match call.arguments.args.as_ref() {
        [arg] if !arg.is_starred_expr() => Some((attr.attr.id.to_string(), arg)),
        _ => None,
    }
}

fn assigns_attribute_of(stmt: &Stmt, me: &str) -> bool {
    let on_me = |t: &Expr| matches!(t, Expr::Attribute(a) if is_name(&a.value, me));
    match stmt {
        Stmt::Assign(a) => a.targets.iter().any(on_me),
        Stmt::AnnAssign(a) => on_me(&a.target),
        _ => false,
    }
}

/// Whether a statement contains `yield`, `yield from` or `await` (it would change what calling forward means).
fn suspends(stmt: &Stmt) -> bool {
    struct Scan(bool);
    impl<'a> Visitor<'a> for Scan {
        fn visit_expr(&mut self, expr: &'a Expr) {
            if matches!(expr, Expr::Yield(_) | Expr::YieldFrom(_) | Expr::Await(_)) {
                self.0 = true;
            }
            visitor::walk_expr(self, expr);
        }
    }
    let mut scan = Scan(false);
    scan.visit_stmt(stmt);
    scan.0
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}
