//! Writing the rewritten forward (docs/design.md §"Rewrite contract") by splicing source slices.

use ruff_python_ast::{Expr, Stmt, StmtFunctionDef};
use ruff_text_size::Ranged;

use crate::analysis::Plan;
use crate::epilogue::EpilogueKind;
use crate::loss::LossForm;
use crate::source::{Source, atom_text, dotted, has_call, reindent};

/// Name of the temporary holding a hidden expression that contains a call (so it is evaluated once).
const HIDDEN_TEMP: &str = "_logitless_hidden";

/// Decorators that only build documentation: dropped, since they look up the class by qualified name and the
/// rewritten function is compiled outside it.
const DOC_DECORATORS: &[&str] = &[
    "auto_docstring",
    "add_start_docstrings",
    "add_start_docstrings_to_model_forward",
    "add_end_docstrings",
    "add_code_sample_docstrings",
    "replace_return_docstrings",
];

fn is_doc_decorator(expr: &Expr) -> bool {
    let target = match expr {
        Expr::Call(c) => &*c.func,
        e => e,
    };
    dotted(target)
        .is_some_and(|d| DOC_DECORATORS.contains(&d.rsplit('.').next().unwrap_or_default()))
}

pub(crate) fn emit(
    src: &Source<'_>,
    func: &StmtFunctionDef,
    plan: &Plan<'_>,
    drop_doc_decorators: bool,
) -> String {
    let body = func.body.as_slice();
    let head_stmt: &Stmt = &body[plan.head_idx];
    let labels_stmt: &Stmt = &body[plan.labels_idx];
    let ind = src.indent_of(head_stmt).to_string();
    let ind4 = format!("{ind}    ");
    let ind8 = format!("{ind}        ");

    let hidden_text = atom_text(src, plan.hidden);
    let hidden = if has_call(plan.hidden) {
        HIDDEN_TEMP.to_string()
    } else {
        hidden_text.clone()
    };
    let head = format!("self.{}", plan.head);

    let mut out = String::new();
    // Guards of auxiliary terms that read the logits: evaluated by `fusable` (they hold no calls and do not read
    // the logits), so a forward they send to the stock path is counted as such.
    let guards = if plan.fused_guards.is_empty() {
        String::new()
    } else {
        format!(", logits_terms_off={}", plan.fused_guards.join(" and "))
    };
    // An epilogue module's class is checked at run time, with the head.
    let modules: String = plan
        .epilogue
        .iter()
        .filter(|s| s.kind == EpilogueKind::Module)
        .map(|s| format!(", {}", s.expr))
        .collect();
    // A vocabulary slice cuts the head's rows; `fusable` keeps a vocabulary-sharded head's forward on the stock path.
    let sliced = if plan
        .epilogue
        .iter()
        .any(|s| s.kind == EpilogueKind::VocabSlice)
    {
        ", vocab_sliced=True"
    } else {
        ""
    };
    // The labels' rebinding runs first on both paths: the test below reads them.
    for s in &plan.hoist {
        out.push_str(src.slice(*s));
        out.push_str(&format!("\n{ind}"));
    }
    out.push_str(&format!(
        "if {} is not None and __logitless__.fusable(self, {head}{modules}{guards}{sliced}):\n",
        plan.labels
    ));
    if has_call(plan.hidden) {
        out.push_str(&format!("{ind4}{HIDDEN_TEMP} = {hidden_text}\n"));
    }
    for s in &plan.setup {
        out.push_str(&reindent(src.slice(*s), &ind4, "    "));
        out.push('\n');
    }
    for s in &plan.pre {
        out.push_str(&format!("{ind4}{}\n", src.slice(*s)));
    }
    let mut args = vec![hidden.clone(), head.clone(), plan.labels_arg.clone()];
    args.push(format!(
        "vocab_size={}",
        plan.vocab.as_deref().unwrap_or("None")
    ));
    for step in &plan.epilogue {
        args.push(format!("{}={}", step.kind.keyword(), step.expr));
    }
    if plan.form == LossForm::CrossEntropy {
        args.push(format!("shift_labels={}", plan.labels));
    }
    if plan.form == LossForm::LossFunction {
        // Which transformers loss the stock call runs is known only at run time (`loss_type`): the causal one
        // shifts, ForMaskedLM (T5Gemma) does not.
        args.push("loss_function=self.loss_function".to_string());
    }
    for (name, value) in &plan.loss_keywords {
        match name {
            Some(n) => args.push(format!("{n}={value}")),
            None => args.push(format!("**{value}")),
        }
    }
    out.push_str(&format!(
        "{ind4}{} = __logitless__.hf_loss({})\n",
        plan.loss,
        args.join(", ")
    ));
    for s in &plan.post {
        out.push_str(&format!("{ind4}{}\n", src.slice(*s)));
    }
    out.push_str(&format!(
        "{ind4}{} = __logitless__.no_logits({hidden}, {head})\n",
        plan.logits
    ));
    out.push_str(&format!("{ind4}if __logitless__.return_logits():\n"));
    for s in &plan.replay {
        out.push_str(&reindent(src.slice(*s), &ind8, "        "));
        out.push('\n');
    }
    out.push_str(&format!("{ind}else:\n"));
    out.push_str(&reindent(
        &stock_region(src, plan, head_stmt, labels_stmt),
        &ind4,
        "    ",
    ));

    splice(
        src,
        func,
        (head_stmt.start().to_usize(), labels_stmt.end().to_usize()),
        out,
        drop_doc_decorators,
    )
}

/// The region's own text from the head statement to the labels branch, less the hoisted statements' lines (they
/// already ran above the fused-path test).
fn stock_region(src: &Source<'_>, plan: &Plan<'_>, head_stmt: &Stmt, labels_stmt: &Stmt) -> String {
    let (start, end) = (head_stmt.start().to_usize(), labels_stmt.end().to_usize());
    let mut text = String::new();
    let mut at = start;
    for s in &plan.hoist {
        let line_start = src.line_start(s.start().to_usize());
        // Through the newline ending the statement's last line.
        let line_end = src.line_end(s.end().to_usize()).min(end);
        text.push_str(&src.text[at..line_start]);
        at = line_end;
    }
    text.push_str(&src.text[at..end]);
    text
}

/// The function from its first decorator's line to its end, with `region` (byte offsets) replaced by
/// `replacement` and the documentation decorators dropped when asked.
pub(crate) fn splice(
    src: &Source<'_>,
    func: &StmtFunctionDef,
    region: (usize, usize),
    replacement: String,
    drop_doc_decorators: bool,
) -> String {
    let mut edits: Vec<(usize, usize, String)> = Vec::new();
    if drop_doc_decorators {
        for d in &func.decorator_list {
            let start = d.start().to_usize();
            let line_start = src.line_start(start);
            if is_doc_decorator(&d.expression) && src.text[line_start..start].trim().is_empty() {
                edits.push((line_start, src.line_end(d.end().to_usize()), String::new()));
            }
        }
    }
    edits.push((region.0, region.1, replacement));
    edits.sort_by_key(|e| e.0);
    // Only the function itself is returned: from its first decorator's line to its end.
    let first = func
        .decorator_list
        .first()
        .map_or(func.start(), |d| d.start())
        .to_usize();
    let mut at = src.line_start(first);
    let mut result = String::with_capacity(func.end().to_usize() - at + 2048);
    for (start, end, text) in edits {
        result.push_str(&src.text[at..start]);
        result.push_str(&text);
        at = end;
    }
    result.push_str(&src.text[at..func.end().to_usize()]);
    result.push('\n');
    result
}
