//! Epilogue modules: a sub-module called on the logits after the head (`logits = self.logit_softcap(logits)`,
//! Inkling2) whose own `forward` is an epilogue over its one input.
//!
//! The rewritten model forward cannot know which class sits in that attribute, so the class is analysed at run
//! time, from its `forward` source, by [`analyse_epilogue_module`]: the same epilogue grammar as in a model forward
//! (spec §1.2), with every constant an attribute of the module (`self.softcap`, read on each call) or a number.
//! Anything else is refused and the model keeps its stock statements for that call.

use ruff_python_ast::{Expr, Stmt, StmtFunctionDef, UnaryOp};

use crate::epilogue::{EpilogueKind, Op, merge_epilogue, parse_epilogue};
use crate::refusal::{ReasonCode as R, Refusal};
use crate::source::{Source, dotted, refuse, simple_assign, with_first_function};

/// A constant of an epilogue module's step.
#[derive(Debug, Clone, PartialEq)]
pub enum ModuleValue {
    /// `self.a.b` → `["a", "b"]`, read from the module instance on each call.
    Attribute(Vec<String>),
    Number(f64),
}

/// One step of an epilogue module, in the order the fused op applies them.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleStep {
    pub kind: EpilogueKind,
    pub value: ModuleValue,
}

/// The epilogue a module's (dedented) `def forward(self, x)` applies to `x`, or why it is not one.
///
/// ```
/// use logitless_rewrite::{EpilogueKind, ModuleValue, analyse_epilogue_module};
/// let steps = analyse_epilogue_module(
///     "def forward(self, x):\n    return torch.tanh(x / self.cap) * self.cap\n",
/// ).unwrap();
/// assert_eq!(steps[0].kind, EpilogueKind::Softcap);
/// assert_eq!(steps[0].value, ModuleValue::Attribute(vec!["cap".into()]));
/// ```
pub fn analyse_epilogue_module(source: &str) -> Result<Vec<ModuleStep>, Refusal> {
    with_first_function(source, analyse_function)
}

fn not_understood(src: &Source<'_>, node: &impl ruff_text_size::Ranged, why: String) -> Refusal {
    refuse(
        R::LogitsRebound,
        src,
        node,
        format!("epilogue module: {why}"),
    )
}

/// `self.a.b` → `["a", "b"]`, a number literal (optionally negated) → its value.
fn module_value(expr: &Expr) -> Option<ModuleValue> {
    match expr {
        Expr::NumberLiteral(n) => number(&n.value),
        Expr::UnaryOp(u) if u.op == UnaryOp::USub => match u.operand.as_ref() {
            Expr::NumberLiteral(n) => match number(&n.value)? {
                ModuleValue::Number(v) => Some(ModuleValue::Number(-v)),
                ModuleValue::Attribute(_) => None,
            },
            _ => None,
        },
        _ => {
            let text = dotted(expr)?;
            let mut parts = text.split('.');
            (parts.next() == Some("self")).then_some(())?;
            let path: Vec<String> = parts.map(str::to_string).collect();
            (!path.is_empty()).then_some(ModuleValue::Attribute(path))
        }
    }
}

fn number(n: &ruff_python_ast::Number) -> Option<ModuleValue> {
    match n {
        ruff_python_ast::Number::Float(f) => Some(ModuleValue::Number(*f)),
        ruff_python_ast::Number::Int(i) => i.as_i64().map(|i| ModuleValue::Number(i as f64)),
        ruff_python_ast::Number::Complex { .. } => None,
    }
}

pub(crate) fn analyse_function(
    src: &Source<'_>,
    func: &StmtFunctionDef,
) -> Result<Vec<ModuleStep>, Refusal> {
    if func.is_async {
        return Err(not_understood(src, func, "its forward is async".into()));
    }
    if let Some(d) = func.decorator_list.first() {
        return Err(not_understood(
            src,
            d,
            format!(
                "its forward is decorated with `{}`",
                src.slice(&d.expression)
            ),
        ));
    }
    let params = &func.parameters;
    let positional: Vec<&str> = params
        .posonlyargs
        .iter()
        .chain(params.args.iter())
        .map(|p| p.parameter.name.id.as_str())
        .collect();
    let simple = params.vararg.is_none() && params.kwarg.is_none() && params.kwonlyargs.is_empty();
    let input = match positional.as_slice() {
        ["self", input] if simple => *input,
        _ => {
            return Err(not_understood(
                src,
                params.as_ref(),
                format!(
                    "its forward takes `{}`, not `(self, x)`",
                    src.slice(params.as_ref())
                ),
            ));
        }
    };
    let text = |e: &Expr| src.slice(e);
    let mut ops: Vec<(Op<'_>, Option<&Expr>, &Stmt)> = Vec::new();
    let body = func.body.as_slice();
    let docstring = matches!(body.first(), Some(Stmt::Expr(e)) if e.value.is_string_literal_expr());
    let Some((last @ Stmt::Return(ret), statements)) = body[usize::from(docstring)..].split_last()
    else {
        return Err(not_understood(
            src,
            func,
            "its forward does not end with `return`".into(),
        ));
    };
    let returned = ret.value.as_deref();
    for stmt in statements {
        let parsed = simple_assign(stmt)
            .filter(|(target, _)| *target == input)
            .and_then(|(_, value)| parse_epilogue(value, input, &text));
        let Some(parsed) = parsed else {
            return Err(not_understood(
                src,
                stmt,
                format!("`{}` is not an epilogue step on `{input}`", src.slice(stmt)),
            ));
        };
        ops.extend(parsed.into_iter().map(|op| (op, None, stmt)));
    }
    match returned {
        Some(Expr::Name(n)) if n.id.as_str() == input => {}
        Some(value) => match parse_epilogue(value, input, &text) {
            Some(parsed) => ops.extend(parsed.into_iter().map(|op| (op, None, last))),
            None => {
                return Err(not_understood(
                    src,
                    value,
                    format!(
                        "it returns `{}`, not an epilogue of `{input}`",
                        src.slice(value)
                    ),
                ));
            }
        },
        None => {
            return Err(not_understood(src, ret, "it returns nothing".into()));
        }
    }
    let mut values: Vec<(&str, ModuleValue)> = Vec::new();
    for (op, _, stmt) in &ops {
        let constant = match op {
            Op::Mul(c) | Op::Div(c) | Op::Add(c) | Op::Softcap(c) => *c,
            Op::Wrap | Op::Tanh | Op::Module(_) => continue,
            Op::VocabSlice(_) => {
                return Err(not_understood(
                    src,
                    *stmt,
                    "it slices the vocabulary: only a forward's own slice is fused".into(),
                ));
            }
        };
        let Some(value) = module_value(constant) else {
            return Err(not_understood(
                src,
                *stmt,
                format!(
                    "the constant `{}` is neither an attribute of `self` nor a number",
                    src.slice(constant)
                ),
            ));
        };
        values.push((src.slice(constant), value));
    }
    let steps = merge_epilogue(src, &ops)?;
    steps
        .into_iter()
        .map(|step| {
            let value = values
                .iter()
                .find(|(t, _)| *t == step.expr)
                .map(|(_, v)| v.clone());
            value
                .map(|value| ModuleStep {
                    kind: step.kind,
                    value,
                })
                .ok_or_else(|| {
                    Refusal::new(
                        R::LogitsRebound,
                        src.line(func),
                        format!("epilogue module: internal: no value for `{}`", step.expr),
                    )
                })
        })
        .collect()
}
