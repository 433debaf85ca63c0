//! Recognising what a forward does to its logits between the head and the loss (spec §1.2).

use ruff_python_ast::{CmpOp, Expr, Operator, Stmt, UnaryOp};

use crate::refusal::{ReasonCode as R, Refusal};
use crate::source::{Source, atom_text, dotted, expr_reads, is_name, refuse};

/// One epilogue step, in the order the fused op applies them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EpilogueKind {
    /// `logits[..., :end]`: a vocabulary padded past its real size, cut back (Inkling); first, so every later
    /// step sees the kept columns.
    VocabSlice,
    /// `logits + bias` (Bart-style `final_logits_bias`).
    LogitsBias,
    /// `logits * s` or `s * logits`.
    Multiply,
    /// `logits / s`.
    Divide,
    /// `c * tanh(logits / c)`.
    Softcap,
    /// `self.<module>(logits)`: a sub-module whose own forward is an epilogue, resolved at run time
    /// ([`crate::analyse_epilogue_module`] on the module's class); always the only step.
    Module,
}

impl EpilogueKind {
    /// The name used in results (`"vocab_slice"`, `"logits_bias"`, `"multiply"`, `"divide"`, `"softcap"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::VocabSlice => "vocab_slice",
            Self::LogitsBias => "logits_bias",
            Self::Multiply => "multiply",
            Self::Divide => "divide",
            Self::Softcap => "softcap",
            Self::Module => "module",
        }
    }

    /// The `hf_loss` keyword that carries this step.
    pub fn keyword(self) -> &'static str {
        match self {
            Self::VocabSlice => "vocab_slice_end",
            Self::LogitsBias => "logits_bias",
            Self::Multiply => "logit_scale_multiply",
            Self::Divide => "logit_scale_divide",
            Self::Softcap => "logit_softcapping",
            Self::Module => "epilogue_module",
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
    /// `self.<module>(logits)`; the expression is the called attribute.
    Module(&'a Expr),
    /// `logits[..., :end]`; the expression is `end`.
    VocabSlice(&'a Expr),
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
pub(crate) fn is_logits_operand(expr: &Expr, logits: &str) -> bool {
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

/// `logits[..., :end]` → `end` (no start, no step, `end` not reading the logits). Python's slice rules then hold for
/// the head's rows as for the logits' columns: `None` or an end past the vocabulary keeps everything.
pub(crate) fn vocab_slice_end<'a>(value: &'a Expr, logits: &str) -> Option<&'a Expr> {
    let Expr::Subscript(sub) = value else {
        return None;
    };
    if !is_name(&sub.value, logits) {
        return None;
    }
    let Expr::Tuple(index) = sub.slice.as_ref() else {
        return None;
    };
    match index.elts.as_slice() {
        [Expr::EllipsisLiteral(_), Expr::Slice(s)] if s.lower.is_none() && s.step.is_none() => {
            let end = s.upper.as_deref()?;
            (!expr_reads(end, logits)).then_some(end)
        }
        _ => None,
    }
}

/// `bias.to(logits.device)` → `bias`; anything else that reads the logits → None.
/// Only module attributes qualify: a per-batch tensor added to the logits (a mask) is not the `[V]` bias the
/// fused op applies.
fn bias_operand<'a>(expr: &'a Expr, logits: &str) -> Option<&'a Expr> {
    let module_attr = |e: &Expr| dotted(e).is_some_and(|d| d.starts_with("self."));
    if !expr_reads(expr, logits) {
        return module_attr(expr).then_some(expr);
    }
    let Expr::Call(call) = expr else { return None };
    let Expr::Attribute(attr) = call.func.as_ref() else {
        return None;
    };
    let device_of_logits = matches!(
        (call.arguments.args.as_ref(), call.arguments.keywords.is_empty()),
        ([Expr::Attribute(dev)], true) if dev.attr.id.as_str() == "device" && is_name(&dev.value, logits)
    );
    (attr.attr.id.as_str() == "to" && device_of_logits && module_attr(&attr.value))
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
    if let Some(end) = vocab_slice_end(value, logits) {
        return Some(vec![Op::VocabSlice(end)]);
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
    /// The called attribute, `self.<attr>`.
    pub callee: &'a Expr,
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

fn is_module_attr(expr: &Expr) -> bool {
    dotted(expr).is_some_and(|d| d.starts_with("self."))
}

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
                Operator::Add if is_self_call(l) && is_module_attr(r) => Some((l, Op::Add(r))),
                Operator::Add if is_self_call(r) && is_module_attr(l) => Some((r, Op::Add(l))),
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
    outer.reverse();
    Ok(HeadCall {
        attr: name,
        callee: &call.func,
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

// --- merging raw operations into steps, and the value each step passes to hf_loss ---

/// Walrus targets in epilogue guards: the emitted keyword re-binds them, so they stay bound on the fused path.
pub(crate) fn epilogue_walrus_names(ops: &[(Op<'_>, Option<&Expr>, &Stmt)]) -> Vec<String> {
    ops.iter()
        .filter_map(|(_, g, _)| *g)
        .filter_map(|g| walrus_in_guard(g).map(|(n, _)| n.to_string()))
        .collect()
}

/// `(name := value) is not None` → (name, whole walrus expression).
fn walrus_in_guard(guard: &Expr) -> Option<(&str, &Expr)> {
    let Expr::Compare(cmp) = guard else {
        return None;
    };
    match (
        cmp.left.as_ref(),
        cmp.ops.as_ref(),
        cmp.comparators.as_ref(),
    ) {
        (Expr::Named(named), [CmpOp::IsNot], [Expr::NoneLiteral(_)]) => match named.target.as_ref()
        {
            Expr::Name(n) => Some((n.id.as_str(), cmp.left.as_ref())),
            _ => None,
        },
        _ => None,
    }
}

/// The expression passed to hf_loss for a step valued `value` under `guard`, so that `None` means "not applied"
/// exactly when the original skips the step.
fn guarded_value(
    src: &Source<'_>,
    value: &Expr,
    guard: Option<&Expr>,
    walrus_emitted: &mut Vec<String>,
) -> String {
    let v = src.slice(value);
    let Some(guard) = guard else {
        return atom_text(src, value);
    };
    if let Some((name, walrus)) = walrus_in_guard(guard)
        && v == name
    {
        if walrus_emitted.iter().any(|n| n == name) {
            return name.to_string();
        }
        walrus_emitted.push(name.to_string());
        return format!("({})", src.slice(walrus));
    }
    if let Expr::Compare(cmp) = guard
        && let ([CmpOp::IsNot], [Expr::NoneLiteral(_)]) =
            (cmp.ops.as_ref(), cmp.comparators.as_ref())
        && src.slice(&*cmp.left) == v
    {
        // `None` skips in both; 0 would divide by zero in the original (degenerate), hf_loss skips it.
        return atom_text(src, value);
    }
    if src.slice(guard) == v {
        // Truthiness: None and 0 skip in both.
        return atom_text(src, value);
    }
    format!("({} if {} else None)", v, src.slice(guard))
}

pub(crate) fn merge_epilogue(
    src: &Source<'_>,
    ops: &[(Op<'_>, Option<&Expr>, &Stmt)],
) -> Result<Vec<EpilogueStep>, Refusal> {
    let real: Vec<&(Op<'_>, Option<&Expr>, &Stmt)> = ops
        .iter()
        .filter(|(o, _, _)| !matches!(o, Op::Wrap))
        .collect();
    let same_guard = |a: Option<&Expr>, b: Option<&Expr>| match (a, b) {
        (None, None) => true,
        (Some(x), Some(y)) => std::ptr::eq(x, y),
        _ => false,
    };
    let mut steps: Vec<(EpilogueKind, &Expr, Option<&Expr>, &Stmt)> = Vec::new();
    let mut i = 0;
    while i < real.len() {
        let (op, guard, stmt) = *real[i];
        match op {
            Op::Div(c) => {
                let triple =
                    real.get(i + 1)
                        .zip(real.get(i + 2))
                        .and_then(|(t, m)| match (t.0, m.0) {
                            (Op::Tanh, Op::Mul(c2))
                                if src.slice(c) == src.slice(c2)
                                    && same_guard(guard, t.1)
                                    && same_guard(guard, m.1) =>
                            {
                                Some(())
                            }
                            _ => None,
                        });
                if triple.is_some() {
                    steps.push((EpilogueKind::Softcap, c, guard, stmt));
                    i += 3;
                    continue;
                }
                steps.push((EpilogueKind::Divide, c, guard, stmt));
            }
            Op::Mul(c) => steps.push((EpilogueKind::Multiply, c, guard, stmt)),
            Op::Add(c) => steps.push((EpilogueKind::LogitsBias, c, guard, stmt)),
            Op::Softcap(c) => steps.push((EpilogueKind::Softcap, c, guard, stmt)),
            Op::Module(m) => steps.push((EpilogueKind::Module, m, guard, stmt)),
            Op::VocabSlice(end) => steps.push((EpilogueKind::VocabSlice, end, guard, stmt)),
            Op::Tanh => {
                return Err(refuse(
                    R::LogitsRebound,
                    src,
                    stmt,
                    "`tanh` of the logits that is not part of a softcap",
                ));
            }
            Op::Wrap => {}
        }
        i += 1;
    }
    if steps.len() > 1
        && let Some(module) = steps.iter().find(|s| s.0 == EpilogueKind::Module)
    {
        return Err(refuse(
            R::EpilogueOrder,
            src,
            module.3,
            format!(
                "epilogue module `{}` together with other epilogue steps: only a module alone is fused",
                src.slice(module.1)
            ),
        ));
    }
    for pair in steps.windows(2) {
        if pair[1].0 <= pair[0].0 {
            return Err(refuse(
                R::EpilogueOrder,
                src,
                pair[1].3,
                format!(
                    "epilogue `{}` after `{}`: the fused op applies a vocabulary slice, bias, multiply, divide, softcap once each in that order",
                    pair[1].0.as_str(),
                    pair[0].0.as_str()
                ),
            ));
        }
    }
    let mut walrus = Vec::new();
    Ok(steps
        .into_iter()
        .map(|(kind, value, guard, _)| EpilogueStep {
            kind,
            expr: guarded_value(src, value, guard, &mut walrus),
        })
        .collect())
}
