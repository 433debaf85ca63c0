//! Recognising what a forward does to its logits between the head and the loss (spec §1.2).

use ruff_python_ast::{Expr, Operator, UnaryOp};

use crate::source::{dotted, expr_reads, is_name};

/// One epilogue step, in the order the fused op applies them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EpilogueKind {
    /// `logits + bias` (Bart-style `final_logits_bias`).
    LogitsBias,
    /// `logits * s` or `s * logits`.
    Multiply,
    /// `logits / s`.
    Divide,
    /// `c * tanh(logits / c)`.
    Softcap,
}

impl EpilogueKind {
    /// The name used in results (`"logits_bias"`, `"multiply"`, `"divide"`, `"softcap"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LogitsBias => "logits_bias",
            Self::Multiply => "multiply",
            Self::Divide => "divide",
            Self::Softcap => "softcap",
        }
    }

    /// The `hf_loss` keyword that carries this step.
    pub fn keyword(self) -> &'static str {
        match self {
            Self::LogitsBias => "logits_bias",
            Self::Multiply => "logit_scale_multiply",
            Self::Divide => "logit_scale_divide",
            Self::Softcap => "logit_softcapping",
        }
    }
}

/// A step with the expression passed to `hf_loss` (it may evaluate to `None` at run time: not set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpilogueStep {
    pub kind: EpilogueKind,
    pub expr: String,
}

/// A raw operation on the logits, before softcap triples are merged.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Op<'a> {
    /// `.float()`, `.contiguous()`, `.to(...)`: no effect on the fp32 loss.
    Wrap,
    Tanh,
    Mul(&'a Expr),
    Div(&'a Expr),
    Add(&'a Expr),
    Softcap(&'a Expr),
}

/// `x.float()`, `x.contiguous()`, `x.to(...)` → `x`.
pub(crate) fn strip_wrap(expr: &Expr) -> Option<&Expr> {
    let Expr::Call(call) = expr else { return None };
    let Expr::Attribute(attr) = call.func.as_ref() else {
        return None;
    };
    let no_args = call.arguments.args.is_empty() && call.arguments.keywords.is_empty();
    match attr.attr.id.as_str() {
        "float" | "contiguous" if no_args => Some(&attr.value),
        "to" if !no_args && call.arguments.args.iter().all(|a| !a.is_starred_expr()) => {
            Some(&attr.value)
        }
        _ => None,
    }
}

fn strip_wraps(mut expr: &Expr) -> &Expr {
    while let Some(inner) = strip_wrap(expr) {
        expr = inner;
    }
    expr
}

/// Whether `expr` is the logits name, possibly under wrappers.
fn is_logits_operand(expr: &Expr, logits: &str) -> bool {
    is_name(strip_wraps(expr), logits)
}

/// `torch.tanh(x)` (and the `nn.functional` spellings) or `x.tanh()` → `x`.
fn tanh_arg(expr: &Expr) -> Option<&Expr> {
    let Expr::Call(call) = expr else { return None };
    if !call.arguments.keywords.is_empty() {
        return None;
    }
    match (call.arguments.args.as_ref(), call.func.as_ref()) {
        ([arg], func) if !arg.is_starred_expr() => {
            let name = dotted(func)?;
            matches!(
                name.as_str(),
                "torch.tanh" | "nn.functional.tanh" | "torch.nn.functional.tanh" | "F.tanh"
            )
            .then_some(arg)
        }
        ([], Expr::Attribute(attr)) if attr.attr.id.as_str() == "tanh" => Some(&attr.value),
        _ => None,
    }
}

/// `tanh(logits / c) * c` or `c * tanh(logits / c)` → `c`.
fn softcap_one_liner<'a>(
    left: &'a Expr,
    right: &'a Expr,
    logits: &str,
    text: &dyn Fn(&Expr) -> &'a str,
) -> Option<&'a Expr> {
    for (t, c) in [(left, right), (right, left)] {
        let Some(arg) = tanh_arg(t) else { continue };
        let Expr::BinOp(div) = strip_wraps(arg) else {
            continue;
        };
        if div.op == Operator::Div
            && is_logits_operand(&div.left, logits)
            && text(&div.right) == text(c)
            && !expr_reads(c, logits)
        {
            return Some(c);
        }
    }
    None
}

/// `bias.to(logits.device)` → `bias`; anything else that reads the logits → None.
fn bias_operand<'a>(expr: &'a Expr, logits: &str) -> Option<&'a Expr> {
    if !expr_reads(expr, logits) {
        return Some(expr);
    }
    let Expr::Call(call) = expr else { return None };
    let Expr::Attribute(attr) = call.func.as_ref() else {
        return None;
    };
    let device_of_logits = matches!(
        (call.arguments.args.as_ref(), call.arguments.keywords.is_empty()),
        ([Expr::Attribute(dev)], true) if dev.attr.id.as_str() == "device" && is_name(&dev.value, logits)
    );
    (attr.attr.id.as_str() == "to" && device_of_logits && !expr_reads(&attr.value, logits))
        .then_some(&*attr.value)
}

/// The operations of `logits = <value>` when `value` is an epilogue applied to `logits`; None otherwise.
pub(crate) fn parse_epilogue<'a>(
    value: &'a Expr,
    logits: &str,
    text: &dyn Fn(&Expr) -> &'a str,
) -> Option<Vec<Op<'a>>> {
    if let Some(inner) = strip_wrap(value) {
        if is_name(inner, logits) {
            return Some(vec![Op::Wrap]);
        }
        let mut ops = parse_epilogue(inner, logits, text)?;
        ops.push(Op::Wrap);
        return Some(ops);
    }
    if let Some(arg) = tanh_arg(value) {
        return is_logits_operand(arg, logits).then(|| vec![Op::Tanh]);
    }
    let Expr::BinOp(bin) = value else { return None };
    let (l, r) = (bin.left.as_ref(), bin.right.as_ref());
    match bin.op {
        Operator::Mult => {
            if let Some(c) = softcap_one_liner(l, r, logits, text) {
                Some(vec![Op::Softcap(c)])
            } else if is_logits_operand(l, logits) && !expr_reads(r, logits) {
                Some(vec![Op::Mul(r)])
            } else if is_logits_operand(r, logits) && !expr_reads(l, logits) {
                Some(vec![Op::Mul(l)])
            } else {
                None
            }
        }
        Operator::Div if is_logits_operand(l, logits) && !expr_reads(r, logits) => {
            Some(vec![Op::Div(r)])
        }
        Operator::Add => {
            if is_logits_operand(l, logits) {
                bias_operand(r, logits).map(|b| vec![Op::Add(b)])
            } else if is_logits_operand(r, logits) {
                bias_operand(l, logits).map(|b| vec![Op::Add(b)])
            } else {
                None
            }
        }
        _ => None,
    }
}

/// What the head statement's value is made of.
pub(crate) struct HeadCall<'a> {
    pub attr: String,
    pub hidden: &'a Expr,
    /// Operations applied to the head's output inside the same expression, innermost first.
    pub ops: Vec<Op<'a>>,
}

/// Why a head-looking expression is not a plain `self.<attr>(hidden)` call.
pub(crate) enum HeadProblem {
    /// Not a head call at all.
    NotAHead,
    Stacked,
    Shape(String),
    NotLinear(String),
}

fn is_self_call(expr: &Expr) -> bool {
    match strip_wraps(expr) {
        Expr::Call(call) => match call.func.as_ref() {
            Expr::Attribute(attr) => is_name(&attr.value, "self"),
            func => dotted(func).is_some_and(|d| d == "torch.stack"),
        },
        _ => false,
    }
}

/// Composite heads transformers builds that are known not to be a plain linear layer.
const KNOWN_COMPOSITE_HEADS: &[&str] = &["cls"];

/// `self.lm_head(h)`, with optional wrappers and a scalar multiply/divide/bias around it.
pub(crate) fn parse_head<'a>(value: &'a Expr, logits: &str) -> Result<HeadCall<'a>, HeadProblem> {
    let mut outer = Vec::new();
    let mut e = value;
    loop {
        if let Some(inner) = strip_wrap(e) {
            outer.push(Op::Wrap);
            e = inner;
            continue;
        }
        if let Expr::BinOp(bin) = e {
            let (l, r) = (bin.left.as_ref(), bin.right.as_ref());
            let step = match bin.op {
                Operator::Mult if is_self_call(l) && !expr_reads(r, logits) => {
                    Some((l, Op::Mul(r)))
                }
                Operator::Mult if is_self_call(r) && !expr_reads(l, logits) => {
                    Some((r, Op::Mul(l)))
                }
                Operator::Div if is_self_call(l) && !expr_reads(r, logits) => Some((l, Op::Div(r))),
                Operator::Add if is_self_call(l) && !expr_reads(r, logits) => Some((l, Op::Add(r))),
                Operator::Add if is_self_call(r) && !expr_reads(l, logits) => Some((r, Op::Add(l))),
                _ => None,
            };
            if let Some((inner, op)) = step {
                outer.push(op);
                e = inner;
                continue;
            }
        }
        break;
    }
    let Expr::Call(call) = e else {
        return Err(HeadProblem::NotAHead);
    };
    if matches!(
        dotted(&call.func).as_deref(),
        Some("torch.stack" | "torch.cat")
    ) {
        return Err(HeadProblem::Stacked);
    }
    let Expr::Attribute(attr) = call.func.as_ref() else {
        return Err(HeadProblem::NotAHead);
    };
    if !is_name(&attr.value, "self") {
        let what = dotted(&call.func)
            .map_or_else(|| "the called expression".to_string(), |d| format!("`{d}`"));
        return Err(HeadProblem::Shape(format!(
            "the head call is on {what}, not on an attribute of `self`"
        )));
    }
    let name = attr.attr.id.to_string();
    let hidden = match (
        call.arguments.args.as_ref(),
        call.arguments.keywords.is_empty(),
    ) {
        ([hidden], true) if !hidden.is_starred_expr() => hidden,
        _ => {
            return Err(HeadProblem::Shape(format!(
                "`self.{name}(...)` is not called with exactly one positional argument"
            )));
        }
    };
    if KNOWN_COMPOSITE_HEADS.contains(&name.as_str()) {
        return Err(HeadProblem::NotLinear(name));
    }
    outer.reverse();
    Ok(HeadCall {
        attr: name,
        hidden,
        ops: outer,
    })
}

/// `-1` as an expression.
pub(crate) fn is_minus_one(expr: &Expr) -> bool {
    match expr {
        Expr::UnaryOp(u) if u.op == UnaryOp::USub => {
            matches!(u.operand.as_ref(), Expr::NumberLiteral(n) if n.value.as_int().and_then(|i| i.as_i64()) == Some(1))
        }
        _ => false,
    }
}
