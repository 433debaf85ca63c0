//! Recognising the canonical end of a causal-LM forward (spec §2) and everything around it.
//!
//! The forward's top-level statements are read backwards from the labels branch: optional `loss = None`,
//! epilogue statements on the logits (possibly under a guard), statements that do not touch the logits
//! ("setup", kept verbatim), and finally the head call `logits = self.<head>(hidden)`. Everything else refuses.

use ruff_python_ast::{BoolOp, CmpOp, Expr, Stmt, StmtFunctionDef, StmtIf};
use ruff_text_size::Ranged;

use crate::epilogue::{
    EpilogueStep, HeadProblem, Op, epilogue_walrus_names, is_logits_operand, is_minus_one,
    merge_epilogue, parse_epilogue, parse_head, vocab_slice_end,
};
use crate::loss::{LossCall, LossForm, find_loss_call, labels_test, no_else};
use crate::refusal::{ReasonCode as R, Refusal};
use crate::source::{
    Source, bound_names, expr_reads, has_call, is_name, mutates_in_place, refuse, simple_assign,
    stmt_binds, stmt_reads,
};

/// Everything the emitter needs, borrowed from the parsed forward.
pub(crate) struct Plan<'a> {
    pub head: String,
    pub hidden: &'a Expr,
    pub logits: String,
    pub loss: String,
    pub labels: String,
    pub labels_arg: String,
    pub vocab: Option<String>,
    pub epilogue: Vec<EpilogueStep>,
    /// Explicit keywords of the loss call other than logits/labels/vocab_size, in source order, as
    /// (name, expression); `None` name is the `**kwargs` entry.
    pub loss_keywords: Vec<(Option<String>, String)>,
    pub form: LossForm,
    pub ce_class: Option<String>,
    /// Index of the head statement and of the labels branch in the function body.
    pub head_idx: usize,
    pub labels_idx: usize,
    /// Region statements that do not touch the logits, run on the fused path before the loss.
    pub setup: Vec<&'a Stmt>,
    /// Region statements that rebind the labels: emitted above the fused-path test, run on both paths.
    pub hoist: Vec<&'a Stmt>,
    /// The head and epilogue statements, replayed when real logits are asked for.
    pub replay: Vec<&'a Stmt>,
    /// Statements of the labels branch kept on the fused path, before and after the loss call.
    pub pre: Vec<&'a Stmt>,
    pub post: Vec<&'a Stmt>,
    /// Extra conditions for the fused path: `not (<guard>)` of labels-branch blocks that read the logits.
    pub fused_guards: Vec<String>,
}

/// One statement of the region between the head call and the labels branch.
enum Item<'a> {
    Head(&'a Stmt),
    Epilogue(&'a Stmt, Vec<Op<'a>>, Option<&'a Expr>),
    LossInit,
    Setup(&'a Stmt),
    /// `labels = ...`: run before the head on both paths (the fused-path test reads the labels).
    Hoist(&'a Stmt),
}

/// `labels = labels.to(...)`: a device move, dropped on the fused path.
fn is_labels_move(stmt: &Stmt, labels: &str) -> bool {
    let Some((target, value)) = simple_assign(stmt) else {
        return false;
    };
    let Expr::Call(call) = value else {
        return false;
    };
    let Expr::Attribute(attr) = call.func.as_ref() else {
        return false;
    };
    target == labels
        && attr.attr.id.as_str() == "to"
        && is_name(&attr.value, labels)
        && call.arguments.args.len() == 1
}

/// The labels branch split around the loss call.
struct BranchParts<'a> {
    /// Kept on the fused path before / after the loss.
    pre: Vec<&'a Stmt>,
    post: Vec<&'a Stmt>,
    /// Names the fused path leaves unbound (consumed or skipped statements).
    dropped: Vec<String>,
    fused_guards: Vec<String>,
    /// `logits = logits.float()` / `.to(...)` inside the branch: only the returned logits see them, so they are
    /// replayed with the head when real logits are asked for.
    wraps: Vec<&'a Stmt>,
}

/// `logits = logits.float()` and the like: a rebind that changes nothing the fused loss depends on.
fn is_wrap_rebind(src: &Source<'_>, stmt: &Stmt, logits: &str) -> bool {
    simple_assign(stmt).is_some_and(|(t, v)| {
        t == logits
            && parse_epilogue(v, logits, &|e: &Expr| src.slice(e))
                .is_some_and(|ops| ops.iter().all(|o| matches!(o, Op::Wrap)))
    })
}

fn split_branch<'a>(
    src: &Source<'a>,
    branch: &'a StmtIf,
    call: &LossCall<'a>,
    logits: &str,
    labels: &str,
) -> Result<BranchParts<'a>, Refusal> {
    let mut dropped: Vec<String> = Vec::new();
    let mut pre = Vec::new();
    let mut post = Vec::new();
    let mut fused_guards = Vec::new();
    let mut wraps: Vec<&Stmt> = Vec::new();
    for (i, stmt) in branch.body.iter().enumerate() {
        if i == call.stmt_idx {
            continue;
        }
        if call.consumed.contains(&i) {
            dropped.extend(bound_names(stmt));
            continue;
        }
        if is_wrap_rebind(src, stmt, logits) {
            wraps.push(stmt);
            continue;
        }
        if i < call.stmt_idx {
            if is_labels_move(stmt, labels) {
                dropped.push(labels.to_string());
            } else if stmt_binds(stmt, labels) || mutates_in_place(stmt, labels) {
                return Err(refuse(
                    R::LabelsMutated,
                    src,
                    stmt,
                    format!("`{labels}` is rebound or mutated before the loss"),
                ));
            } else if stmt_binds(stmt, logits) || mutates_in_place(stmt, logits) {
                return Err(refuse(
                    R::LossInputNotLogits,
                    src,
                    stmt,
                    format!("`{logits}` is changed inside the labels branch"),
                ));
            } else if stmt_reads(stmt, logits) {
                return Err(refuse(
                    R::LabelsBranchReadsLogits,
                    src,
                    stmt,
                    "the labels branch reads the logits before the loss",
                ));
            } else if let Some(name) = dropped.iter().find(|n| stmt_reads(stmt, n)) {
                return Err(refuse(
                    R::DroppedNameUsed,
                    src,
                    stmt,
                    format!(
                        "`{name}` is read in the labels branch but not bound on the fused path"
                    ),
                ));
            } else {
                pre.push(stmt);
            }
        } else if stmt_reads(stmt, logits) || stmt_binds(stmt, logits) {
            // An auxiliary term from the logits: fusable only when its guard is off at run time.
            match stmt {
                Stmt::If(s)
                    if s.elif_else_clauses.is_empty()
                        && !expr_reads(&s.test, logits)
                        && !has_call(&s.test) =>
                {
                    fused_guards.push(format!("not ({})", src.slice(&*s.test)));
                    // The loss itself is bound by hf_loss on the fused path.
                    dropped.extend(bound_names(stmt).into_iter().filter(|n| *n != call.loss));
                }
                _ => {
                    return Err(refuse(
                        R::LabelsBranchReadsLogits,
                        src,
                        stmt,
                        "the labels branch computes more from the logits than the loss",
                    ));
                }
            }
        } else {
            post.push(stmt);
        }
    }

    Ok(BranchParts {
        pre,
        post,
        dropped,
        fused_guards,
        wraps,
    })
}

/// `logits.shape[-1]` or `logits.size(-1)`.
fn is_last_dim_of(expr: &Expr, logits: &str) -> bool {
    match expr {
        Expr::Subscript(sub) => {
            is_minus_one(&sub.slice)
                && matches!(sub.value.as_ref(), Expr::Attribute(a) if a.attr.id.as_str() == "shape" && is_name(&a.value, logits))
        }
        Expr::Call(call) => {
            call.arguments.keywords.is_empty()
                && matches!(call.arguments.args.as_ref(), [arg] if is_minus_one(arg))
                && matches!(call.func.as_ref(), Expr::Attribute(a) if a.attr.id.as_str() == "size" && is_name(&a.value, logits))
        }
        _ => false,
    }
}

/// Whether a module called on the logits is named like an output head: then the earlier call is a transform
/// before the head (`logits = self.final_norm(h); logits = self.lm_head(logits)`), not a head followed by an
/// epilogue module. The run time checks the classes either way; this keeps such forwards refused by name.
fn names_a_head(attr: &str) -> bool {
    attr.contains("head")
        || matches!(
            attr,
            "output"
                | "embed_out"
                | "decoder"
                | "proj_out"
                | "out_proj"
                | "cls"
                | "logits_proj"
                | "output_projection"
                | "score"
                | "classifier"
        )
}

/// `if end is not None and end < logits.shape[-1]: logits = logits[..., :end]` (Inkling's padded vocabulary) →
/// `end`. The guard reads the logits' width only, and skips exactly the ends for which the slice keeps every
/// column (`None`, or at least the width), so the slice alone computes the same.
fn guarded_vocab_slice<'a>(
    src: &Source<'a>,
    guarded: &'a StmtIf,
    logits: &str,
) -> Option<&'a Expr> {
    let [inner] = guarded.body.as_slice() else {
        return None;
    };
    if !guarded.elif_else_clauses.is_empty() {
        return None;
    }
    let end = simple_assign(inner)
        .filter(|(t, _)| *t == logits)
        .and_then(|(_, v)| vocab_slice_end(v, logits))?;
    let Expr::BoolOp(test) = guarded.test.as_ref() else {
        return None;
    };
    let [Expr::Compare(not_none), Expr::Compare(below)] = test.values.as_slice() else {
        return None;
    };
    let same = |e: &Expr| src.slice(e) == src.slice(end) && !has_call(e);
    let not_none_ok = matches!(
        (not_none.ops.as_ref(), not_none.comparators.as_ref()),
        ([CmpOp::IsNot], [Expr::NoneLiteral(_)])
    ) && same(&not_none.left);
    let below_ok = matches!(
        (below.ops.as_ref(), below.comparators.as_ref()),
        ([CmpOp::Lt], [width]) if is_last_dim_of(width, logits)
    ) && same(&below.left);
    (test.op == BoolOp::And && not_none_ok && below_ok).then_some(end)
}

/// Reads the function body backwards from the labels branch to the head statement.
fn walk_region<'a>(
    src: &Source<'a>,
    body: &'a [Stmt],
    labels_idx: usize,
    logits: &str,
    labels: &str,
    loss: &str,
) -> Result<(usize, Vec<Item<'a>>), Refusal> {
    let mut items: Vec<Item<'a>> = Vec::new();
    let mut head_idx = None;
    let text = |e: &Expr| -> &'a str { src.slice(e) };
    for idx in (0..labels_idx).rev() {
        let stmt = &body[idx];
        if let Some((target, value)) = simple_assign(stmt) {
            if target == logits {
                if let Some(ops) = parse_epilogue(value, logits, &text) {
                    items.push(Item::Epilogue(stmt, ops, None));
                    continue;
                }
                match parse_head(value, logits) {
                    Ok(h) if expr_reads(h.hidden, logits) => {
                        // `logits = self.<module>(logits)`: a module epilogue if a head call came earlier.
                        let earlier_head = body[..idx].iter().rev().find_map(|s| {
                            let (t, v) = simple_assign(s)?;
                            let e = parse_head(v, logits)
                                .ok()
                                .filter(|e| t == logits && !expr_reads(e.hidden, logits))?;
                            Some(e.attr)
                        });
                        if earlier_head.is_some()
                            && is_logits_operand(h.hidden, logits)
                            && !names_a_head(&h.attr)
                        {
                            let mut ops = vec![Op::Module(h.callee)];
                            ops.extend(h.ops.iter().copied());
                            items.push(Item::Epilogue(stmt, ops, None));
                            continue;
                        }
                        let (code, msg) = if let Some(first) = earlier_head {
                            (
                                R::LogitsRebound,
                                format!(
                                    "`{logits}` goes through `self.{first}` then `self.{}`",
                                    h.attr
                                ),
                            )
                        } else {
                            (
                                R::HiddenReadsLogits,
                                format!("the head's input reads `{logits}`"),
                            )
                        };
                        return Err(refuse(code, src, stmt, msg));
                    }
                    Ok(_) => {
                        items.push(Item::Head(stmt));
                        head_idx = Some(idx);
                        break;
                    }
                    Err(HeadProblem::NotAHead) if !expr_reads(value, logits) => {
                        return Err(refuse(
                            R::NoHeadCall,
                            src,
                            stmt,
                            format!(
                                "`{logits}` comes from `{}`, not a head call",
                                src.slice(value)
                            ),
                        ));
                    }
                    Err(HeadProblem::NotAHead) => {
                        return Err(refuse(
                            R::LogitsRebound,
                            src,
                            stmt,
                            format!(
                                "`{logits}` is rebound by something that is not a supported epilogue"
                            ),
                        ));
                    }
                    Err(HeadProblem::Stacked) => {
                        return Err(refuse(
                            R::StackedHeads,
                            src,
                            stmt,
                            "several heads are stacked",
                        ));
                    }
                    Err(HeadProblem::Shape(m)) => {
                        return Err(refuse(R::HeadCallShape, src, stmt, m));
                    }
                }
            }
            if target == loss && value.is_none_literal_expr() {
                items.push(Item::LossInit);
                continue;
            }
        }
        if let Stmt::If(guarded) = stmt
            && (stmt_binds(stmt, logits) || stmt_reads(stmt, logits))
        {
            if let Some(end) = guarded_vocab_slice(src, guarded, logits) {
                // The guard only skips slices that keep every column: the unguarded slice is the same.
                items.push(Item::Epilogue(stmt, vec![Op::VocabSlice(end)], None));
                continue;
            }
            if !guarded.elif_else_clauses.is_empty() || expr_reads(&guarded.test, logits) {
                return Err(refuse(
                    R::EpilogueGuard,
                    src,
                    stmt,
                    "a guard around the logits reads them or has an `else`",
                ));
            }
            let mut ops = Vec::new();
            for inner in &guarded.body {
                let parsed = simple_assign(inner)
                    .filter(|(t, _)| *t == logits)
                    .and_then(|(_, v)| parse_epilogue(v, logits, &text));
                match parsed {
                    Some(o) => ops.extend(o),
                    None => {
                        let code = if mutates_in_place(inner, logits) {
                            R::LogitsMutated
                        } else {
                            R::LogitsRebound
                        };
                        return Err(refuse(
                            code,
                            src,
                            inner,
                            format!(
                                "`{logits}` is changed by something that is not a supported epilogue"
                            ),
                        ));
                    }
                }
            }
            items.push(Item::Epilogue(stmt, ops, Some(&guarded.test)));
            continue;
        }
        if mutates_in_place(stmt, logits) {
            return Err(refuse(
                R::LogitsMutated,
                src,
                stmt,
                format!("`{logits}` is mutated in place"),
            ));
        }
        if stmt_binds(stmt, logits) {
            return Err(refuse(
                R::LogitsRebound,
                src,
                stmt,
                format!("`{logits}` is rebound"),
            ));
        }
        if stmt_reads(stmt, logits) {
            return Err(refuse(
                R::UnexpectedStatement,
                src,
                stmt,
                format!("a statement reads `{logits}` before the loss"),
            ));
        }
        if stmt_binds(stmt, labels) {
            // `labels = outputs.labels if ... else labels` (Qwen2-Audio): moved above the fused-path test,
            // which reads the labels, when that changes nothing else (checked in order below).
            if matches!(simple_assign(stmt), Some((t, _)) if t == labels) {
                items.push(Item::Hoist(stmt));
                continue;
            }
            return Err(refuse(
                R::LabelsMutated,
                src,
                stmt,
                format!("`{labels}` is rebound before the loss"),
            ));
        }
        items.push(Item::Setup(stmt));
    }
    let Some(head_idx) = head_idx else {
        return Err(refuse(
            R::NoHeadCall,
            src,
            &body[labels_idx],
            format!("no `{logits} = self.<head>(...)` before the labels branch"),
        ));
    };
    items.reverse();
    Ok((head_idx, items))
}

pub(crate) fn analyse<'a>(
    src: &Source<'a>,
    func: &'a StmtFunctionDef,
) -> Result<Plan<'a>, Refusal> {
    let body = func.body.as_slice();

    // 1. The labels branch: the first top-level `if labels is not None:` that computes a loss.
    let candidates: Vec<(usize, &StmtIf, &str)> = body
        .iter()
        .enumerate()
        .filter_map(|(i, s)| labels_test(s).map(|(b, n)| (i, b, n)))
        .collect();
    let Some(&(last_idx, last_branch, _)) = candidates.last() else {
        return Err(Refusal::new(
            R::NoLabelsBranch,
            src.line(func),
            "no top-level `if labels is not None:` branch",
        ));
    };
    let mut found = None;
    for &(i, branch, name) in &candidates {
        if let Ok(call) = find_loss_call(src, branch) {
            found = Some((i, branch, name, call));
            break;
        }
    }
    let (labels_idx, branch, labels, call) = match found {
        Some(f) => f,
        None => {
            // A head problem explains the odd loss better than the loss does (e.g. one head per codebook).
            for s in &body[..last_idx] {
                if let Some((_, value)) = simple_assign(s)
                    && let Err(HeadProblem::Stacked) = parse_head(value, "")
                {
                    return Err(refuse(R::StackedHeads, src, s, "several heads are stacked"));
                }
            }
            return Err(find_loss_call(src, last_branch).err().unwrap_or_else(|| {
                refuse(R::UnsupportedLoss, src, &body[last_idx], "no loss call")
            }));
        }
    };
    no_else(src, branch)?;
    let Expr::Name(logits_expr) = call.logits else {
        return Err(refuse(
            R::LossInputNotLogits,
            src,
            call.logits,
            format!(
                "the loss consumes `{}`, not a logits variable",
                src.slice(call.logits)
            ),
        ));
    };
    let logits = logits_expr.id.as_str();
    let unconsumed = |j: &usize| !call.consumed.contains(j);
    if let Some(s) = branch.body[..call.stmt_idx]
        .iter()
        .enumerate()
        .filter(|(j, _)| unconsumed(j))
        .map(|(_, s)| s)
        .find(|s| stmt_binds(s, logits) && !is_wrap_rebind(src, s, logits))
    {
        return Err(refuse(
            R::LossInputNotLogits,
            src,
            s,
            format!(
                "the loss consumes `{logits}`, computed inside the labels branch (shifted or sliced logits)"
            ),
        ));
    }
    let labels_arg_ok = is_name(call.labels, labels) || call.labels.is_none_literal_expr();
    if !labels_arg_ok {
        return Err(refuse(
            R::LabelsMutated,
            src,
            call.labels,
            format!(
                "the loss is given `{}` instead of `{labels}`",
                src.slice(call.labels)
            ),
        ));
    }

    // 2. The labels branch around the loss call.
    let BranchParts {
        pre,
        post,
        dropped,
        fused_guards,
        wraps: branch_wraps,
    } = split_branch(src, branch, &call, logits, labels)?;

    // 3. Backwards from the labels branch to the head call.
    let (head_idx, items) = walk_region(src, body, labels_idx, logits, labels, &call.loss)?;

    // The head statement again, now for its parts.
    let Item::Head(head_stmt) = items[0] else {
        return Err(refuse(
            R::NoHeadCall,
            src,
            &body[head_idx],
            "internal: head statement not first",
        ));
    };
    let Some((_, head_value)) = simple_assign(head_stmt) else {
        return Err(refuse(
            R::NoHeadCall,
            src,
            head_stmt,
            "internal: head statement is not an assignment",
        ));
    };
    let Ok(head) = parse_head(head_value, logits) else {
        return Err(refuse(
            R::NoHeadCall,
            src,
            head_stmt,
            "internal: head statement did not re-parse",
        ));
    };
    if expr_reads(head.hidden, logits) {
        return Err(refuse(
            R::HiddenReadsLogits,
            src,
            head.hidden,
            format!("the head's input reads `{logits}`"),
        ));
    }

    // 4. Order-sensitive checks: names rebound on the fused path before they are read by the head/epilogue.
    let mut replay: Vec<&Stmt> = Vec::new();
    let mut setup: Vec<&Stmt> = Vec::new();
    let mut hoist: Vec<&Stmt> = Vec::new();
    let mut ops: Vec<(Op<'a>, Option<&'a Expr>, &'a Stmt)> =
        head.ops.iter().map(|o| (*o, None, head_stmt)).collect();
    for item in &items {
        match item {
            Item::Head(s) => replay.push(s),
            Item::Epilogue(s, o, guard) => {
                replay.push(s);
                ops.extend(o.iter().map(|op| (*op, *guard, *s)));
            }
            Item::LossInit => {}
            Item::Setup(s) => {
                for name in bound_names(s) {
                    if replay.iter().any(|r| stmt_reads(r, &name)) {
                        return Err(refuse(
                            R::UnexpectedStatement,
                            src,
                            *s,
                            format!("`{name}` is rebound after the head reads it"),
                        ));
                    }
                }
                setup.push(s);
            }
            Item::Hoist(s) => {
                // Moving it above the region's earlier statements must not change what they or it read.
                let earlier = replay.iter().chain(setup.iter());
                let mut clash = None;
                for e in earlier {
                    if stmt_reads(e, labels) {
                        clash = Some(format!("`{labels}` is read before it is rebound"));
                    } else if let Some(n) = bound_names(e).into_iter().find(|n| stmt_reads(s, n)) {
                        clash = Some(format!(
                            "the rebinding of `{labels}` reads `{n}`, bound after the head"
                        ));
                    }
                    if clash.is_some() {
                        break;
                    }
                }
                if let Some(message) = clash {
                    return Err(refuse(R::LabelsMutated, src, *s, message));
                }
                hoist.push(s);
            }
        }
    }
    replay.extend(branch_wraps.iter().copied());
    for s in pre.iter().chain(post.iter()) {
        for name in bound_names(s) {
            if replay.iter().any(|r| stmt_reads(r, &name)) {
                return Err(refuse(
                    R::UnexpectedStatement,
                    src,
                    *s,
                    format!("the labels branch rebinds `{name}`, which the head reads"),
                ));
            }
        }
    }

    // 5. Softcap triples, order, and the expressions passed to hf_loss.
    let epilogue = merge_epilogue(src, &ops)?;

    let check_free = |e: &Expr, what: &str| {
        if expr_reads(e, logits) {
            return Err(refuse(
                R::LossArgsReadLogits,
                src,
                e,
                format!("the {what} reads `{logits}`"),
            ));
        }
        match dropped.iter().find(|n| expr_reads(e, n)) {
            Some(n) => Err(refuse(
                R::DroppedNameUsed,
                src,
                e,
                format!("the {what} reads `{n}`, which the fused path does not bind"),
            )),
            None => Ok(()),
        }
    };
    // `vocab_size=logits.shape[-1]`: every other epilogue step is elementwise, so this is the head's output size,
    // cut by a vocabulary slice, which hf_loss takes when no vocabulary size is given.
    let vocab = call.vocab.filter(|v| !is_last_dim_of(v, logits));
    if let Some(v) = vocab {
        check_free(v, "vocab size")?;
    }
    for (_, v) in &call.keywords {
        check_free(v, "loss keyword")?;
    }
    for (name, _) in &call.keywords {
        if let Some(n) = name
            && [
                "logits_bias",
                "logit_scale_multiply",
                "logit_scale_divide",
                "logit_softcapping",
            ]
            .contains(&n.as_str())
        {
            return Err(refuse(
                R::UnsupportedLoss,
                src,
                branch,
                format!("the loss call already passes `{n}`"),
            ));
        }
    }

    // 6. What runs after the labels branch: names the fused path leaves unbound, and uses of the logits.
    let replay_bound: Vec<String> = replay
        .iter()
        .flat_map(|s| bound_names(s))
        .filter(|n| n != logits && !epilogue_walrus_names(&ops).contains(n))
        .collect();
    let later: Vec<&Stmt> = post
        .iter()
        .copied()
        .chain(body[labels_idx + 1..].iter())
        .collect();
    for s in &later {
        for name in dropped.iter().chain(replay_bound.iter()) {
            if stmt_reads(s, name) {
                return Err(refuse(
                    R::DroppedNameUsed,
                    src,
                    *s,
                    format!("`{name}` is read after the loss but not bound on the fused path"),
                ));
            }
        }
    }
    for s in &body[labels_idx + 1..] {
        if let Some(bad) = logits_use_after(s, logits) {
            return Err(refuse(
                R::LogitsUsedAfterLoss,
                src,
                bad,
                format!("`{logits}` is used after the loss (it is empty on the fused path)"),
            ));
        }
        if stmt_binds(s, logits) {
            break;
        }
    }

    // 7. Formatting the emitter relies on.
    let region = &body[head_idx..=labels_idx];
    for s in region {
        if crate::source::has_multiline_string(src, s) {
            return Err(refuse(
                R::UnsupportedFormatting,
                src,
                s,
                "a multi-line string in the rewritten region",
            ));
        }
        if !src.indent_of(s).chars().all(|c| c == ' ') {
            return Err(refuse(
                R::UnsupportedFormatting,
                src,
                s,
                "the region is not indented with spaces only, one statement a line",
            ));
        }
    }
    let region_text = src.range(ruff_text_size::TextRange::new(
        region[0].start(),
        region[region.len() - 1].end(),
    ));
    if region_text
        .lines()
        .any(|l| l.trim_start_matches(' ').starts_with('\t'))
    {
        return Err(refuse(
            R::UnsupportedFormatting,
            src,
            &region[0],
            "tab indentation in the rewritten region",
        ));
    }
    let body_indent = format!("{}    ", src.indent_of(&region[0]));
    for s in pre.iter().chain(post.iter()) {
        if src.indent_of(*s) != body_indent {
            return Err(refuse(
                R::UnsupportedFormatting,
                src,
                *s,
                "the labels branch is not indented by four spaces",
            ));
        }
    }

    Ok(Plan {
        head: head.attr,
        hidden: head.hidden,
        logits: logits.to_string(),
        loss: call.loss,
        labels: labels.to_string(),
        labels_arg: match &call.label_mask {
            // The masked shift: the labels ignored where the shifted mask is 0, then the plain causal loss.
            Some((mask, crop)) => format!(
                "__logitless__.mask_shifted_labels({}, {mask}, {:?})",
                src.slice(call.labels),
                crop.as_str()
            ),
            None => src.slice(call.labels).to_string(),
        },
        vocab: vocab.map(|v| src.slice(v).to_string()),
        epilogue,
        loss_keywords: call
            .keywords
            .iter()
            .map(|(n, v)| (n.clone(), src.slice(*v).to_string()))
            .collect(),
        form: call.form,
        ce_class: call.ce_class.clone(),
        head_idx,
        labels_idx,
        setup,
        hoist,
        replay,
        pre,
        post,
        fused_guards,
    })
}

/// The first read of `logits` after the loss that is not just handing it back (keyword, tuple/list element,
/// dict value, return value).
fn logits_use_after<'a>(stmt: &'a Stmt, logits: &str) -> Option<&'a Expr> {
    use ruff_python_ast::visitor::{self, Visitor};
    struct Find<'n, 'a> {
        logits: &'n str,
        bad: Option<&'a Expr>,
    }
    impl<'a> Find<'_, 'a> {
        fn handed_back(&self, e: &Expr) -> bool {
            is_name(e, self.logits)
        }
    }
    impl<'a> Visitor<'a> for Find<'_, 'a> {
        fn visit_stmt(&mut self, stmt: &'a Stmt) {
            if let Stmt::Return(r) = stmt
                && r.value.as_deref().is_some_and(|v| self.handed_back(v))
            {
                return;
            }
            visitor::walk_stmt(self, stmt);
        }
        fn visit_expr(&mut self, expr: &'a Expr) {
            if self.bad.is_some() {
                return;
            }
            match expr {
                Expr::Name(n) if n.id.as_str() == self.logits && n.ctx.is_load() => {
                    self.bad = Some(expr)
                }
                Expr::Call(call) => {
                    self.visit_expr(&call.func);
                    for a in &call.arguments.args {
                        self.visit_expr(a);
                    }
                    for kw in &call.arguments.keywords {
                        if !self.handed_back(&kw.value) {
                            self.visit_expr(&kw.value);
                        }
                    }
                }
                Expr::Tuple(ruff_python_ast::ExprTuple { elts, .. })
                | Expr::List(ruff_python_ast::ExprList { elts, .. }) => {
                    for e in elts {
                        if !self.handed_back(e) {
                            self.visit_expr(e);
                        }
                    }
                }
                Expr::Dict(d) => {
                    for item in &d.items {
                        if let Some(k) = &item.key {
                            self.visit_expr(k);
                        }
                        if !self.handed_back(&item.value) {
                            self.visit_expr(&item.value);
                        }
                    }
                }
                _ => visitor::walk_expr(self, expr),
            }
        }
    }
    let mut f = Find { logits, bad: None };
    f.visit_stmt(stmt);
    f.bad
}
