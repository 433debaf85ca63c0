//! Recognising the loss of a labels branch: `self.loss_function(...)`, or `CrossEntropyLoss()` on aligned or
//! causally shifted logits and labels (the 4.x manual shift), traced back through the branch's statements.

use ruff_python_ast::{CmpOp, Expr, Stmt, StmtIf, UnaryOp};

use crate::epilogue::{is_minus_one, strip_wrap};
use crate::refusal::{ReasonCode as R, Refusal};
use crate::source::{Source, bound_names, dotted, expr_reads, is_name, refuse, simple_assign};

/// How the loss is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossForm {
    /// `self.loss_function(logits, labels, vocab_size, ...)`.
    LossFunction,
    /// `CrossEntropyLoss()(logits.view(-1, V), labels.view(-1))`: token-level CE on already-aligned labels,
    /// fused as `shift_labels=labels` (no shift, mean over non-ignored tokens).
    CrossEntropy,
    /// `CrossEntropyLoss()` on `logits[..., :-1, :]` and `labels[..., 1:]` (the 4.x manual shift): the causal
    /// loss with its mean, fused as `hf_loss(..., labels)` without `**kwargs`.
    ShiftedCrossEntropy,
    /// `CrossEntropyLoss()` of a sub-model's logits (encoder-decoder wrappers): fused by handing the labels to the
    /// sub-model, whose own loss is that (`crate::delegate`).
    Delegated,
}

impl LossForm {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LossFunction => "loss_function",
            Self::CrossEntropy => "cross_entropy",
            Self::ShiftedCrossEntropy => "shifted_cross_entropy",
            Self::Delegated => "delegated",
        }
    }
}

/// The loss call of a labels branch and what it consumes.
pub(crate) struct LossCall<'a> {
    pub(crate) stmt_idx: usize,
    pub(crate) loss: String,
    pub(crate) logits: &'a Expr,
    pub(crate) labels: &'a Expr,
    pub(crate) vocab: Option<&'a Expr>,
    pub(crate) keywords: Vec<(Option<String>, &'a Expr)>,
    pub(crate) form: LossForm,
    /// The cross-entropy forms' constructor as written (`CrossEntropyLoss`, `nn.CrossEntropyLoss`, ...): the
    /// installer checks that it names torch's class in the module it runs in.
    pub(crate) ce_class: Option<String>,
    /// Statements of the branch that only prepare the loss's arguments (shift, view, device move, the
    /// `CrossEntropyLoss()` object): replaced by the fused call.
    pub(crate) consumed: Vec<usize>,
    /// A shift that keeps only the positions an attention mask marks (`MaskedShift`): the mask's name and crop.
    pub(crate) label_mask: Option<(String, MaskCrop)>,
}

/// How a masked shift takes the attention mask of the shifted positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskCrop {
    /// `mask[..., 1:]`.
    SkipFirst,
    /// `mask[:, -(logits.shape[1] - 1):]`: the last positions (a mask longer than the sequence, prefix tuning).
    Last,
}

impl MaskCrop {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SkipFirst => "skip-first",
            Self::Last => "last",
        }
    }
}

/// ```python
/// if attention_mask is not None:
///     shift_attention_mask = attention_mask[..., 1:]           # or [:, -(logits.shape[1] - 1):], .to(...)
///     shift_logits = logits[..., :-1, :][shift_attention_mask.to(logits.device) != 0].contiguous()
///     shift_labels = labels[..., 1:][shift_attention_mask.to(labels.device) != 0].contiguous()
/// else:
///     shift_logits = logits[..., :-1, :].contiguous()
///     shift_labels = labels[..., 1:].contiguous()
/// ```
///
/// The causal shift restricted to the positions the mask keeps (Qwen2-Audio, Granite Speech): the same loss as the
/// plain shift on labels ignored wherever the shifted mask is 0.
struct MaskedShift<'a> {
    mask: &'a str,
    crop: MaskCrop,
    logits_target: &'a str,
    labels_target: &'a str,
    logits: &'a Expr,
    labels: &'a Expr,
}

fn masked_shift<'a>(src: &Source<'a>, stmt: &'a Stmt) -> Option<MaskedShift<'a>> {
    let Stmt::If(s) = stmt else { return None };
    let Expr::Compare(test) = s.test.as_ref() else {
        return None;
    };
    let Expr::Name(mask) = test.left.as_ref() else {
        return None;
    };
    if test.ops.as_ref() != [CmpOp::IsNot]
        || !matches!(test.comparators.as_ref(), [Expr::NoneLiteral(_)])
    {
        return None;
    }
    let [otherwise] = s.elif_else_clauses.as_slice() else {
        return None;
    };
    if otherwise.test.is_some() {
        return None;
    }
    let slice_is = |e: &Expr, allowed: &[&str]| -> bool {
        let text: String = src
            .slice(e)
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        allowed.contains(&text.as_str())
    };
    // `base[<slice>]` under `.contiguous()` / `.to(...)`: (base name expr, the subscript).
    let shifted = |e: &'a Expr, allowed: &[&str]| -> Option<&'a Expr> {
        let mut e = e;
        while let Some(inner) = strip_wrap(e) {
            e = inner;
        }
        let Expr::Subscript(sub) = e else { return None };
        (matches!(sub.value.as_ref(), Expr::Name(_)) && slice_is(&sub.slice, allowed))
            .then_some(&*sub.value)
    };
    const LOGITS: &[&str] = &["...,:-1,:", ":,:-1,:"];
    const LABELS: &[&str] = &["...,1:", ":,1:"];
    // The else arm: the plain shift.
    let [Some((lt, lv)), Some((bt, bv))] =
        [otherwise.body.first(), otherwise.body.get(1)].map(|s| s.and_then(simple_assign))
    else {
        return None;
    };
    let (logits, labels) = (shifted(lv, LOGITS)?, shifted(bv, LABELS)?);
    if otherwise.body.len() != 2 {
        return None;
    }
    let Expr::Name(logits_name) = logits else {
        return None;
    };
    // The masked arm: the crop, then the same two selected by `crop != 0`.
    let [Some((mt, mv)), Some((lt2, lv2)), Some((bt2, bv2))] =
        [s.body.first(), s.body.get(1), s.body.get(2)].map(|s| s.and_then(simple_assign))
    else {
        return None;
    };
    if s.body.len() != 3 || (lt2, bt2) != (lt, bt) || mt == mask.id.as_str() {
        return None;
    }
    let mut m = mv;
    while let Some(inner) = strip_wrap(m) {
        m = inner;
    }
    let Expr::Subscript(crop_sub) = m else {
        return None;
    };
    if !is_name(&crop_sub.value, mask.id.as_str()) {
        return None;
    }
    let last = format!(":,-({}.shape[1]-1):", logits_name.id);
    let crop = if slice_is(&crop_sub.slice, LABELS) {
        MaskCrop::SkipFirst
    } else if slice_is(&crop_sub.slice, &[last.as_str()]) {
        MaskCrop::Last
    } else {
        return None;
    };
    // `<shifted>[<crop> != 0]` under wrappers, the shifted part as in the else arm.
    let selected = |e: &'a Expr, allowed: &[&str], base: &Expr| -> bool {
        let mut e = e;
        while let Some(inner) = strip_wrap(e) {
            e = inner;
        }
        let Expr::Subscript(sel) = e else {
            return false;
        };
        let Expr::Compare(cmp) = sel.slice.as_ref() else {
            return false;
        };
        let mut left = cmp.left.as_ref();
        while let Some(inner) = strip_wrap(left) {
            left = inner;
        }
        let zero = matches!(cmp.comparators.as_ref(), [Expr::NumberLiteral(n)] if n.value.as_int().and_then(|i| i.as_u64()) == Some(0));
        cmp.ops.as_ref() == [CmpOp::NotEq]
            && zero
            && is_name(left, mt)
            && shifted(&sel.value, allowed).is_some_and(|b| src.slice(b) == src.slice(base))
    };
    if !selected(lv2, LOGITS, logits) || !selected(bv2, LABELS, labels) {
        return None;
    }
    Some(MaskedShift {
        mask: mask.id.as_str(),
        crop,
        logits_target: lt,
        labels_target: bt,
        logits,
        labels,
    })
}

/// Where a cross-entropy argument comes from, followed back through the branch.
struct Traced<'a> {
    origin: &'a Expr,
    shifted: bool,
    vocab: Option<&'a Expr>,
    consumed: Vec<usize>,
    label_mask: Option<(String, MaskCrop)>,
}

/// Follows a cross-entropy argument back through `body[..upto]`: `.view(-1[, V])`, `.contiguous()`, `.to(...)`,
/// at most one causal shift slice (`[..., :-1, :]` for logits, `[..., 1:]` for labels), and renames.
fn trace<'a>(
    src: &Source<'a>,
    body: &'a [Stmt],
    mut upto: usize,
    arg: &'a Expr,
    logits_side: bool,
) -> Option<Traced<'a>> {
    let mut t = Traced {
        origin: arg,
        shifted: false,
        vocab: None,
        consumed: Vec::new(),
        label_mask: None,
    };
    let mut e = arg;
    loop {
        if let Some((base, v)) = view_call(e) {
            match (logits_side, v) {
                (true, Some(v)) if t.vocab.is_none() => t.vocab = Some(v),
                (false, None) => {}
                _ => return None,
            }
            e = base;
        } else if let Some(inner) = strip_wrap(e) {
            e = inner;
        } else if let Expr::Subscript(sub) = e {
            let slice: String = src
                .slice(&*sub.slice)
                .chars()
                .filter(|c| !c.is_whitespace())
                .collect();
            let allowed: &[&str] = if logits_side {
                &["...,:-1,:", ":,:-1,:"]
            } else {
                &["...,1:", ":,1:"]
            };
            if t.shifted || !allowed.contains(&slice.as_str()) {
                return None;
            }
            t.shifted = true;
            e = &sub.value;
        } else if let Expr::Name(n) = e {
            let def = body[..upto]
                .iter()
                .rposition(|s| simple_assign(s).is_some_and(|(target, _)| target == n.id.as_str()));
            match def {
                Some(j) => {
                    t.consumed.push(j);
                    upto = j;
                    e = simple_assign(&body[j]).map(|(_, v)| v)?;
                }
                None => {
                    // Bound by a masked shift (both arms): the shift's origin, with the mask to apply to the labels.
                    let found = body[..upto].iter().enumerate().rev().find_map(|(j, s)| {
                        let m = masked_shift(src, s)?;
                        let target = if logits_side {
                            m.logits_target
                        } else {
                            m.labels_target
                        };
                        (target == n.id.as_str()).then_some((j, m))
                    });
                    if let Some((j, m)) = found {
                        if t.shifted {
                            return None;
                        }
                        t.consumed.push(j);
                        t.shifted = true;
                        t.label_mask = Some((m.mask.to_string(), m.crop));
                        t.origin = if logits_side { m.logits } else { m.labels };
                        return Some(t);
                    }
                    t.origin = e;
                    return Some(t);
                }
            }
        } else {
            return None;
        }
    }
}

/// `CrossEntropyLoss()` and the constructor keywords whose effect the fused loss reproduces exactly:
/// `ignore_index=<int literal>` (returned, to be passed on) and `reduction="mean"` (the default). `None` when
/// `expr` is not such a constructor: other keywords (`weight`, `label_smoothing`, another reduction) and positional
/// arguments are not understood.
pub(crate) fn ce_constructor(expr: &Expr) -> Option<Option<&Expr>> {
    let Expr::Call(call) = expr else { return None };
    if !names_ce(expr) || !call.arguments.args.is_empty() {
        return None;
    }
    let mut ignore_index = None;
    for kw in &call.arguments.keywords {
        match kw.arg.as_ref().map(|a| a.id.as_str()) {
            Some("ignore_index") if int_literal(&kw.value) => ignore_index = Some(&kw.value),
            Some("reduction") if is_string(&kw.value, "mean") => {}
            _ => return None,
        }
    }
    Some(ignore_index)
}

/// A call of `CrossEntropyLoss`, whatever its arguments.
fn names_ce(expr: &Expr) -> bool {
    let Expr::Call(call) = expr else { return false };
    dotted(&call.func).is_some_and(|d| {
        matches!(
            d.as_str(),
            "CrossEntropyLoss" | "nn.CrossEntropyLoss" | "torch.nn.CrossEntropyLoss"
        )
    })
}

fn is_ce_constructor(expr: &Expr) -> bool {
    ce_constructor(expr).is_some()
}

/// `7`, `-100`: an integer literal, possibly negated.
fn int_literal(expr: &Expr) -> bool {
    let e = match expr {
        Expr::UnaryOp(u) if u.op == UnaryOp::USub => u.operand.as_ref(),
        e => e,
    };
    matches!(e, Expr::NumberLiteral(n) if n.value.as_int().is_some())
}

fn is_string(expr: &Expr, value: &str) -> bool {
    matches!(expr, Expr::StringLiteral(s) if s.value.to_str() == value)
}

/// `x.view(-1, V)` → (x, V); `x.view(-1)` → (x, None); the same with `reshape` (same values, a copy at most).
pub(crate) fn view_call(expr: &Expr) -> Option<(&Expr, Option<&Expr>)> {
    let Expr::Call(call) = expr else { return None };
    let Expr::Attribute(attr) = call.func.as_ref() else {
        return None;
    };
    if !matches!(attr.attr.id.as_str(), "view" | "reshape") || !call.arguments.keywords.is_empty() {
        return None;
    }
    match call.arguments.args.as_ref() {
        [m] if is_minus_one(m) => Some((&attr.value, None)),
        [m, v] if is_minus_one(m) && !v.is_starred_expr() => Some((&attr.value, Some(v))),
        _ => None,
    }
}

/// Finds the loss call in a labels branch.
pub(crate) fn find_loss_call<'a>(
    src: &Source<'a>,
    branch: &'a StmtIf,
) -> Result<LossCall<'a>, Refusal> {
    let mut ce_names: Vec<&str> = Vec::new();
    for (i, stmt) in branch.body.iter().enumerate() {
        let Some((target, value)) = simple_assign(stmt) else {
            continue;
        };
        if is_ce_constructor(value) {
            ce_names.push(target);
            continue;
        }
        if names_ce(value) {
            return Err(refuse(
                R::UnsupportedLoss,
                src,
                value,
                "`CrossEntropyLoss` with options other than a literal `ignore_index` and `reduction=\"mean\"`",
            ));
        }
        let Expr::Call(call) = value else { continue };
        let func = dotted(&call.func);
        if func.as_deref() == Some("self.loss_function") {
            let mut logits = None;
            let mut labels = None;
            let mut vocab = None;
            let mut keywords = Vec::new();
            for (pos, arg) in call.arguments.args.iter().enumerate() {
                let slot = match pos {
                    0 => &mut logits,
                    1 => &mut labels,
                    2 => &mut vocab,
                    _ => {
                        return Err(refuse(
                            R::UnsupportedLoss,
                            src,
                            arg,
                            "loss_function called with more than three positional arguments",
                        ));
                    }
                };
                if arg.is_starred_expr() {
                    return Err(refuse(
                        R::UnsupportedLoss,
                        src,
                        arg,
                        "starred argument in the loss call",
                    ));
                }
                *slot = Some(arg);
            }
            for kw in &call.arguments.keywords {
                match kw.arg.as_ref().map(|a| a.id.as_str()) {
                    Some("logits") => logits = Some(&kw.value),
                    Some("labels") => labels = Some(&kw.value),
                    Some("vocab_size") => vocab = Some(&kw.value),
                    Some(name) => keywords.push((Some(name.to_string()), &kw.value)),
                    None if matches!(kw.value, Expr::Name(_)) => keywords.push((None, &kw.value)),
                    None => {
                        return Err(refuse(
                            R::UnsupportedLoss,
                            src,
                            kw,
                            "`**` of something other than a name in the loss call",
                        ));
                    }
                }
            }
            let (Some(logits), Some(labels)) = (logits, labels) else {
                return Err(refuse(
                    R::UnsupportedLoss,
                    src,
                    stmt,
                    "loss_function call without logits and labels",
                ));
            };
            return Ok(LossCall {
                stmt_idx: i,
                loss: target.to_string(),
                logits,
                labels,
                vocab,
                keywords,
                form: LossForm::LossFunction,
                ce_class: None,
                consumed: Vec::new(),
                label_mask: None,
            });
        }
        if func.as_deref().is_some_and(|f| ce_names.contains(&f)) {
            let args = call.arguments.args.as_ref();
            let ([logits_view, labels_view], true) = (args, call.arguments.keywords.is_empty())
            else {
                return Err(refuse(
                    R::UnsupportedLoss,
                    src,
                    stmt,
                    "cross-entropy call with unexpected arguments",
                ));
            };
            let body = branch.body.as_slice();
            let traced =
                trace(src, body, i, logits_view, true).zip(trace(src, body, i, labels_view, false));
            let Some((lt, bt)) = traced.filter(|(lt, bt)| {
                lt.shifted == bt.shifted && lt.vocab.is_some() && lt.label_mask == bt.label_mask
            }) else {
                return Err(refuse(
                    R::UnsupportedLoss,
                    src,
                    stmt,
                    "cross-entropy not of the form `loss_fct(logits.view(-1, V), labels.view(-1))`, shifted or not",
                ));
            };
            let ce_def = body[..i].iter().rposition(|s| {
                simple_assign(s)
                    .is_some_and(|(t, v)| Some(t) == func.as_deref() && is_ce_constructor(v))
            });
            let constructor = ce_def.and_then(|j| simple_assign(&body[j])).map(|(_, v)| v);
            let ignore_index = constructor.and_then(ce_constructor).flatten();
            let ce_class = constructor.and_then(|v| match v {
                Expr::Call(c) => dotted(&c.func),
                _ => None,
            });
            let mut consumed: Vec<usize> = lt
                .consumed
                .iter()
                .chain(bt.consumed.iter())
                .copied()
                .chain(ce_def)
                .collect();
            consumed.sort_unstable();
            consumed.dedup();
            // V is kept only when it is computed from neither the logits nor a name the fused path drops.
            let dropped_names: Vec<String> = consumed
                .iter()
                .flat_map(|&j| bound_names(&body[j]))
                .collect();
            let vocab = lt.vocab.filter(|v| {
                !expr_reads(v, logits_name(lt.origin))
                    && !dropped_names.iter().any(|n| expr_reads(v, n))
            });
            let form = if lt.shifted {
                LossForm::ShiftedCrossEntropy
            } else {
                LossForm::CrossEntropy
            };
            return Ok(LossCall {
                stmt_idx: i,
                loss: target.to_string(),
                logits: lt.origin,
                labels: bt.origin,
                vocab,
                keywords: ignore_index
                    .map(|v| (Some("ignore_index".to_string()), v))
                    .into_iter()
                    .collect(),
                form,
                ce_class,
                consumed,
                label_mask: lt.label_mask,
            });
        }
    }
    Err(refuse(
        R::UnsupportedLoss,
        src,
        branch,
        "the labels branch computes no `self.loss_function(...)` or `CrossEntropyLoss()` loss",
    ))
}

pub(crate) fn logits_name(expr: &Expr) -> &str {
    match expr {
        Expr::Name(n) => n.id.as_str(),
        _ => "",
    }
}

/// A labels branch with an `elif`/`else` is refused: the fused path replaces the whole `if`.
pub(crate) fn no_else(src: &Source<'_>, branch: &StmtIf) -> Result<(), Refusal> {
    if branch.elif_else_clauses.is_empty() {
        Ok(())
    } else {
        Err(refuse(
            R::NonEmptyElse,
            src,
            branch,
            "the labels branch has an `elif`/`else`",
        ))
    }
}

/// `if <name> is not None:` → `<name>`.
pub(crate) fn labels_test(stmt: &Stmt) -> Option<(&StmtIf, &str)> {
    let Stmt::If(s) = stmt else { return None };
    let Expr::Compare(cmp) = s.test.as_ref() else {
        return None;
    };
    match (
        cmp.left.as_ref(),
        cmp.ops.as_ref(),
        cmp.comparators.as_ref(),
    ) {
        (Expr::Name(n), [CmpOp::IsNot], [Expr::NoneLiteral(_)]) if n.id.as_str() == "labels" => {
            Some((s, n.id.as_str()))
        }
        _ => None,
    }
}
