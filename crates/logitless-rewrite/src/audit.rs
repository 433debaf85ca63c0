//! Auditing a transformers `models/` tree: which causal LMs the rewriter patches, and why not.

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use ruff_python_ast::{Expr, Stmt, StmtClassDef, StmtFunctionDef};

use crate::epilogue::{EpilogueKind, EpilogueStep};
use crate::epilogue_module::analyse_function as analyse_epilogue_function;
use crate::head::split_head_function;
use crate::refusal::{ReasonCode, Refusal};
use crate::source::{Source, dotted};
use crate::{LossForm, Rewrite, RewriteOptions, rewrite_function};

/// Errors reading the tree (a file that does not parse is reported per class, not as an error).
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
}

/// Which family a class belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClassKind {
    CausalLm,
    ConditionalGeneration,
}

impl ClassKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CausalLm => "causal-lm",
            Self::ConditionalGeneration => "conditional-generation",
        }
    }
}

/// The verdict on one class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Patched,
    Refused(Refusal),
}

/// One audited class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassReport {
    pub class: String,
    /// Dotted module, e.g. `transformers.models.llama.modeling_llama`.
    pub module: String,
    pub kind: ClassKind,
    pub outcome: Outcome,
    /// The head attribute when the forward was understood.
    pub head: Option<String>,
    /// Whether `__init__` builds the head as `nn.Linear` (None: construction not found in this file).
    pub head_is_linear: Option<bool>,
    /// For a composite head, the sub-module path from the head to the `nn.Linear` the loss is fused on
    /// (`["predictions", "decoder"]` for BERT's `self.cls`); empty when the head is the linear layer itself.
    pub head_path: Vec<String>,
    pub epilogue: Vec<EpilogueStep>,
    pub loss_form: Option<LossForm>,
    /// The class in this file whose `forward` was analysed, when it is inherited.
    pub forward_from: Option<String>,
    /// 1-based line in the file (of the refusal, or of the head statement).
    pub line: usize,
}

/// Audits every `models/<name>/modeling_*.py` under `models_dir`, in parallel; sorted by class name.
pub fn audit_tree(models_dir: &Path) -> Result<Vec<ClassReport>, AuditError> {
    if !models_dir.is_dir() {
        return Err(AuditError::NotADirectory(models_dir.to_path_buf()));
    }
    fn io(path: &Path) -> impl Fn(std::io::Error) -> AuditError + '_ {
        move |source| AuditError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(models_dir).map_err(io(models_dir))? {
        let dir = entry.map_err(io(models_dir))?.path();
        // `models/auto` holds factories (`AutoModelForCausalLM`, 4.x's `AutoModelWithLMHead`), not models.
        if !dir.is_dir() || dir.file_name().is_some_and(|n| n == "auto") {
            continue;
        }
        for file in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let path = file.map_err(io(&dir))?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            // TensorFlow and Flax ports (transformers 4.x) are not torch modules.
            let torch_module =
                !name.starts_with("modeling_tf_") && !name.starts_with("modeling_flax_");
            if name.starts_with("modeling_") && name.ends_with(".py") && torch_module {
                files.push(path);
            }
        }
    }
    // A pool of our own per call, not rayon's global one: a process that forked (DataLoader workers) after the
    // global pool started has no pool threads in the child, and would wait on them forever.
    let per_file: Result<Vec<Vec<ClassReport>>, AuditError> =
        match rayon::ThreadPoolBuilder::new().build() {
            Ok(pool) => pool.install(|| files.par_iter().map(|p| audit_path(p)).collect()),
            Err(_) => files.iter().map(|p| audit_path(p)).collect(),
        };
    let mut reports: Vec<ClassReport> = per_file?.into_iter().flatten().collect();
    reports.sort_by(|a, b| a.class.cmp(&b.class).then_with(|| a.module.cmp(&b.module)));
    Ok(reports)
}

fn audit_path(path: &Path) -> Result<Vec<ClassReport>, AuditError> {
    let text = std::fs::read_to_string(path).map_err(|source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let package = path
        .parent()
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let stem = path
        .file_stem()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    Ok(audit_file(
        &text,
        &format!("transformers.models.{package}.{stem}"),
    ))
}

/// Transformers names its language-modelling heads `*ForCausalLM` and `*ForConditionalGeneration`; its causal-LM
/// and seq2seq-LM auto mappings still register older heads under other names (GPT-2's `GPT2LMHeadModel`,
/// `MarianMTModel`, the encoder-decoder wrappers, ...). These are all the names the installer patches and the
/// audit reports.
const CAUSAL_SUFFIXES: &[&str] = &["ForCausalLM", "LMHeadModel", "ModelWithLMHead"];
const CAUSAL_NAMES: &[&str] = &["BertGenerationDecoder"];
const CONDITIONAL_SUFFIXES: &[&str] = &[
    "ForConditionalGeneration",
    "ForTextToText",
    "ForSpeechToText",
    // VisionEncoderDecoderModel, SpeechEncoderDecoderModel: wrappers around any encoder and decoder.
    "EncoderDecoderModel",
];
const CONDITIONAL_NAMES: &[&str] = &["MarianMTModel", "EncoderDecoderModel"];

/// Whether a class of this name is a language-model head logitless patches, and of which kind: the one rule
/// the audit, the installer and verify share (exposed to Python as `_core.class_kind`).
pub fn class_kind(name: &str) -> Option<ClassKind> {
    let named = |suffixes: &[&str], names: &[&str]| {
        names.contains(&name)
            || suffixes
                .iter()
                .any(|s| name.len() > s.len() && name.ends_with(s))
    };
    if named(CAUSAL_SUFFIXES, CAUSAL_NAMES) {
        Some(ClassKind::CausalLm)
    } else if named(CONDITIONAL_SUFFIXES, CONDITIONAL_NAMES) {
        Some(ClassKind::ConditionalGeneration)
    } else {
        None
    }
}

/// Whether a file's text may define a class `class_kind` accepts (a cheap pre-check before parsing).
fn mentions_candidate(text: &str) -> bool {
    [
        CAUSAL_SUFFIXES,
        CAUSAL_NAMES,
        CONDITIONAL_SUFFIXES,
        CONDITIONAL_NAMES,
    ]
    .iter()
    .flat_map(|words| words.iter())
    .any(|word| text.contains(word))
}

/// Audits one modeling file's text.
pub fn audit_file(text: &str, module: &str) -> Vec<ClassReport> {
    // Cheap pre-check: most modeling files define no class we report.
    if !mentions_candidate(text) {
        return Vec::new();
    }
    // Parse only the classes we report and their bases: the rest of the file is blanked to newlines (line
    // numbers are kept). A cut that lands in a column-0 string fails to parse; then the whole file is parsed.
    let compact = compact_text(text);
    let (text, parsed) = match ruff_python_parser::parse_module(&compact) {
        Ok(p) => (compact.as_str(), Ok(p)),
        Err(_) => (text, ruff_python_parser::parse_module(text)),
    };
    let src = Source::new(text);
    let parsed = match parsed {
        Ok(p) => p,
        Err(e) => {
            let line = src.line_of(e.location.start().to_usize());
            return candidate_names(text)
                .into_iter()
                .map(|(class, kind)| ClassReport {
                    class,
                    module: module.to_string(),
                    kind,
                    outcome: Outcome::Refused(Refusal::new(
                        ReasonCode::ParseError,
                        line,
                        e.error.to_string(),
                    )),
                    head: None,
                    head_is_linear: None,
                    head_path: Vec::new(),
                    epilogue: Vec::new(),
                    loss_form: None,
                    forward_from: None,
                    line,
                })
                .collect();
        }
    };
    let classes: Vec<&StmtClassDef> = parsed
        .syntax()
        .body
        .iter()
        .filter_map(|s| match s {
            Stmt::ClassDef(c) => Some(c),
            _ => None,
        })
        .collect();
    let mut out = Vec::new();
    for class in &classes {
        let Some(kind) = class_kind(class.name.id.as_str()) else {
            continue;
        };
        let forward = find_method(&classes, class, "forward");
        // A class with no forward in this file that does not inherit one from a model class (transformers'
        // `AutoModelForCausalLM(_BaseAutoModelClass)` factories) is no model: nothing to report, as the installer.
        if forward.is_none() && !inherits_model_class(class) {
            continue;
        }
        if kind == ClassKind::ConditionalGeneration {
            // Only those whose loss is a cross-entropy of the logits: transformers' loss_function (the causal-LM
            // loss) or an encoder-decoder's `CrossEntropyLoss` on its decoder labels. Generators with other
            // losses are not logitless' business (and are refused at run time all the same).
            let cross_entropy = forward.is_some_and(|(_, f)| {
                let text = src.slice(f);
                text.contains("self.loss_function(") || text.contains("CrossEntropyLoss(")
            });
            if !cross_entropy {
                continue;
            }
        }
        out.push(audit_class(&src, &classes, class, kind, forward, module));
    }
    out
}

/// Whether a base class's name (last dotted segment) is a causal-LM or conditional-generation class.
fn inherits_model_class(class: &StmtClassDef) -> bool {
    class
        .arguments
        .iter()
        .flat_map(|a| a.args.iter())
        .any(|base| {
            let name = match base {
                Expr::Name(n) => n.id.as_str(),
                Expr::Attribute(a) => a.attr.id.as_str(),
                _ => return false,
            };
            class_kind(name).is_some()
        })
}

/// Byte spans of top-level classes: from a `class` line to the next column-0 statement.
fn class_spans(text: &str) -> Vec<(&str, usize, usize)> {
    let mut spans: Vec<(&str, usize, usize)> = Vec::new();
    let mut open: Option<(&str, usize)> = None;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let starts_statement =
            line.starts_with(|c: char| !c.is_whitespace() && c != '#' && c != ')' && c != ']');
        if starts_statement {
            if let Some((name, start)) = open.take() {
                spans.push((name, start, offset));
            }
            if let Some(rest) = line.strip_prefix("class ") {
                let len = rest
                    .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                open = Some((&rest[..len], offset));
            }
        }
        offset += line.len();
    }
    if let Some((name, start)) = open {
        spans.push((name, start, text.len()));
    }
    spans
}

/// Base class names written on a class's first line.
fn base_names(class_line: &str) -> Vec<&str> {
    let Some(open) = class_line.find('(') else {
        return Vec::new();
    };
    let inner = &class_line[open + 1..];
    let inner = &inner[..inner.find(')').unwrap_or(inner.len())];
    inner
        .split(',')
        .map(str::trim)
        .filter(|b| !b.is_empty())
        .collect()
}

/// The file with every line outside the reported classes (and their in-file bases) emptied.
/// Classes up to this long that a reported class constructs are kept for their forward (epilogue modules).
const SMALL_CLASS_LINES: usize = 30;

fn compact_text(text: &str) -> String {
    let spans = class_spans(text);
    let mut keep = vec![false; spans.len()];
    let mut stack: Vec<usize> = (0..spans.len())
        .filter(|&i| class_kind(spans[i].0).is_some())
        .collect();
    while let Some(i) = stack.pop() {
        if keep[i] {
            continue;
        }
        keep[i] = true;
        let (_, start, end) = spans[i];
        let body = &text[start..end];
        let first_line = body.lines().next().unwrap_or_default();
        for base in base_names(first_line) {
            stack.extend((0..spans.len()).filter(|&j| spans[j].0 == base && !keep[j]));
        }
        // Composite heads (`self.cls = BertOnlyMLMHead(config)`) and epilogue modules (`self.logit_softcap =
        // Inkling2Softcap(...)`, a few lines) are resolved through their own forward.
        stack.extend((0..spans.len()).filter(|&j| {
            let (name, j_start, j_end) = spans[j];
            let small = text[j_start..j_end].lines().count() <= SMALL_CLASS_LINES;
            !keep[j] && (name.contains("Head") || small) && body.contains(&format!("{name}("))
        }));
    }
    let mut out = String::with_capacity(text.len() / 4);
    let mut at = 0;
    for (i, &(_, start, end)) in spans.iter().enumerate() {
        if !keep[i] {
            continue;
        }
        out.extend(std::iter::repeat_n(
            '\n',
            text[at..start].matches('\n').count(),
        ));
        out.push_str(&text[start..end]);
        at = end;
    }
    out.extend(std::iter::repeat_n('\n', text[at..].matches('\n').count()));
    out
}

fn candidate_names(text: &str) -> Vec<(String, ClassKind)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("class "))
        .filter_map(|rest| {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            class_kind(&name).map(|k| (name, k))
        })
        .filter(|(_, k)| *k == ClassKind::CausalLm)
        .collect()
}

/// The method `name` of `class`, or of a base class defined in the same file (first base first).
fn find_method<'a>(
    classes: &[&'a StmtClassDef],
    class: &'a StmtClassDef,
    name: &str,
) -> Option<(&'a StmtClassDef, &'a StmtFunctionDef)> {
    let mut current = class;
    for _ in 0..8 {
        let own = current.body.iter().find_map(|s| match s {
            Stmt::FunctionDef(f) if f.name.id.as_str() == name => Some(f),
            _ => None,
        });
        if let Some(f) = own {
            return Some((current, f));
        }
        let bases = current
            .arguments
            .as_ref()
            .map(|a| a.args.as_ref())
            .unwrap_or_default();
        current = bases.iter().find_map(|b| {
            let base = dotted(b)?;
            classes.iter().find(|c| c.name.id.as_str() == base).copied()
        })?;
    }
    None
}

/// What a head attribute is, as far as this file tells.
enum HeadResolution {
    Linear,
    /// A composite head whose forward ends in an `nn.Linear`, reached through this sub-module path.
    Composite(Vec<String>),
    /// Why it is neither (completes "`self.<head>` ...").
    NotLinear(String),
    Unresolved,
}

/// Composite heads nest a few levels at most (BERT: `cls` → `predictions` → `decoder`).
const MAX_HEAD_DEPTH: usize = 4;

fn resolve_head(
    src: &Source<'_>,
    classes: &[&StmtClassDef],
    class: &StmtClassDef,
    attr: &str,
    depth: usize,
) -> HeadResolution {
    let Some(values) = init_assignments(classes, class, attr) else {
        return HeadResolution::Unresolved;
    };
    if values.iter().all(|v| is_linear_constructor(v)) {
        return HeadResolution::Linear;
    }
    let built = |v: &Expr| {
        src.slice(v)
            .split('(')
            .next()
            .unwrap_or_default()
            .to_string()
    };
    let [value] = values.as_slice() else {
        return HeadResolution::NotLinear(
            "is built in several ways in __init__, not all as nn.Linear".into(),
        );
    };
    let Some(composite) = constructed_class(classes, value) else {
        return HeadResolution::NotLinear(format!(
            "is built as `{}`, neither nn.Linear nor a head class of this file",
            built(value)
        ));
    };
    if depth >= MAX_HEAD_DEPTH {
        return HeadResolution::NotLinear("nests composite heads too deeply".into());
    }
    let Some((_, forward)) = find_method(classes, composite, "forward") else {
        return HeadResolution::NotLinear(format!(
            "is a `{}` whose forward is not in this file",
            composite.name.id
        ));
    };
    let split = match split_head_function(src, forward) {
        Ok(split) => split,
        Err(refusal) => {
            return HeadResolution::NotLinear(format!(
                "is a `{}` ({})",
                composite.name.id, refusal.message
            ));
        }
    };
    let inner = resolve_head(src, classes, composite, &split.final_attr, depth + 1);
    let mut path = vec![split.final_attr.clone()];
    match inner {
        HeadResolution::Linear => HeadResolution::Composite(path),
        HeadResolution::Composite(rest) => {
            path.extend(rest);
            HeadResolution::Composite(path)
        }
        HeadResolution::NotLinear(why) => HeadResolution::NotLinear(format!(
            "is a `{}` ending in `self.{}`, which {why}",
            composite.name.id, split.final_attr
        )),
        HeadResolution::Unresolved => HeadResolution::NotLinear(format!(
            "is a `{}` ending in `self.{}`, not built in an __init__ of this file",
            composite.name.id, split.final_attr
        )),
    }
}

/// The values `self.<attr>` is assigned in `__init__` (of the class or a base in this file).
fn init_assignments<'a>(
    classes: &[&'a StmtClassDef],
    class: &'a StmtClassDef,
    attr: &str,
) -> Option<Vec<&'a Expr>> {
    let mut current = Some(class);
    for _ in 0..8 {
        let c = current?;
        let (owner, init) = find_method(classes, c, "__init__")?;
        let mut values = Vec::new();
        collect_self_assignments(&init.body, attr, &mut values);
        if !values.is_empty() {
            return Some(values);
        }
        // Not set here: look in the base class's __init__ (super().__init__ chain within this file).
        let bases = owner
            .arguments
            .as_ref()
            .map(|a| a.args.as_ref())
            .unwrap_or_default();
        current = bases.iter().find_map(|b| {
            let base = dotted(b)?;
            classes.iter().find(|c| c.name.id.as_str() == base).copied()
        });
    }
    None
}

/// A loss type assigned in `__init__` that the fused path does not compute: anything but the causal-LM loss and
/// `ForMaskedLM` (T5Gemma's `self.loss_type = "ForMaskedLM"`: the same cross-entropy on unshifted labels, which the
/// rewritten forward passes to `hf_loss` as its `loss_function`).
fn non_causal_loss_type(classes: &[&StmtClassDef], class: &StmtClassDef) -> Option<String> {
    ["loss_type", "_loss_type"].iter().find_map(|attr| {
        init_assignments(classes, class, attr)?
            .iter()
            .find_map(|v| match v {
                Expr::StringLiteral(lit)
                    if !matches!(lit.value.to_str(), "ForCausalLM" | "ForMaskedLM") =>
                {
                    Some(lit.value.to_str().to_string())
                }
                _ => None,
            })
    })
}

/// `SomeHead(...)` where `SomeHead` is a class of this file.
fn constructed_class<'a>(classes: &[&'a StmtClassDef], expr: &Expr) -> Option<&'a StmtClassDef> {
    let Expr::Call(call) = expr else { return None };
    let name = dotted(&call.func)?;
    classes.iter().find(|c| c.name.id.as_str() == name).copied()
}

fn is_linear_constructor(expr: &Expr) -> bool {
    let Expr::Call(call) = expr else { return false };
    dotted(&call.func)
        .is_some_and(|d| matches!(d.as_str(), "nn.Linear" | "torch.nn.Linear" | "Linear"))
}

fn collect_self_assignments<'a>(body: &'a [Stmt], attr: &str, out: &mut Vec<&'a Expr>) {
    for stmt in body {
        match stmt {
            Stmt::Assign(a) => {
                let hit = a.targets.iter().any(|t| matches!(t, Expr::Attribute(at) if at.attr.id.as_str() == attr && dotted(&at.value).as_deref() == Some("self")));
                if hit {
                    out.push(&a.value);
                }
            }
            Stmt::AnnAssign(a) => {
                if let (Expr::Attribute(at), Some(v)) = (a.target.as_ref(), a.value.as_deref())
                    && at.attr.id.as_str() == attr
                    && dotted(&at.value).as_deref() == Some("self")
                {
                    out.push(v);
                }
            }
            Stmt::If(s) => {
                collect_self_assignments(&s.body, attr, out);
                for clause in &s.elif_else_clauses {
                    collect_self_assignments(&clause.body, attr, out);
                }
            }
            Stmt::With(w) => collect_self_assignments(&w.body, attr, out),
            Stmt::Try(t) => {
                collect_self_assignments(&t.body, attr, out);
                collect_self_assignments(&t.orelse, attr, out);
                collect_self_assignments(&t.finalbody, attr, out);
            }
            _ => {}
        }
    }
}

/// An epilogue module built in `__init__` from a class of this file whose forward is not an epilogue: the run time
/// would always take the stock path, so the audit says so. One built elsewhere is left to the run time.
fn epilogue_module_refusal(
    src: &Source<'_>,
    classes: &[&StmtClassDef],
    class: &StmtClassDef,
    rewrite: &Rewrite,
) -> Option<Refusal> {
    let step = rewrite
        .epilogue
        .iter()
        .find(|s| s.kind == EpilogueKind::Module)?;
    let attr = step.expr.strip_prefix("self.")?;
    let values = init_assignments(classes, class, attr)?;
    let [value] = values.as_slice() else {
        return None;
    };
    let module_class = constructed_class(classes, value)?;
    let (_, forward) = find_method(classes, module_class, "forward")?;
    let refusal = analyse_epilogue_function(src, forward).err()?;
    Some(Refusal::new(
        refusal.code,
        rewrite.line,
        format!(
            "`{}` is a `{}` ({})",
            step.expr, module_class.name.id, refusal.message
        ),
    ))
}

fn audit_class(
    src: &Source<'_>,
    classes: &[&StmtClassDef],
    class: &StmtClassDef,
    kind: ClassKind,
    forward: Option<(&StmtClassDef, &StmtFunctionDef)>,
    module: &str,
) -> ClassReport {
    let mut report = ClassReport {
        class: class.name.id.to_string(),
        module: module.to_string(),
        kind,
        outcome: Outcome::Patched,
        head: None,
        head_is_linear: None,
        head_path: Vec::new(),
        epilogue: Vec::new(),
        loss_form: None,
        forward_from: None,
        line: src.line(class),
    };
    let Some((owner, func)) = forward else {
        let bases: Vec<String> = class
            .arguments
            .iter()
            .flat_map(|a| a.args.iter())
            .map(|b| src.slice(b).to_string())
            .collect();
        report.outcome = Outcome::Refused(Refusal::new(
            ReasonCode::NoForward,
            report.line,
            format!(
                "no forward in this file (inherited from {})",
                bases.join(", ")
            ),
        ));
        return report;
    };
    if owner.name.id != class.name.id {
        report.forward_from = Some(owner.name.id.to_string());
    }
    match rewrite_function(src, func, &RewriteOptions::default()) {
        Err(refusal) => {
            report.line = refusal.line;
            report.outcome = Outcome::Refused(refusal);
        }
        Ok(rewrite) => {
            report.line = rewrite.line;
            if rewrite.loss_form == LossForm::Delegated {
                // The loss is handed to a sub-model: its own class is audited (and checked at run time).
                report.loss_form = Some(rewrite.loss_form);
                report.head = Some(rewrite.head);
                return report;
            }
            if let Some(loss_type) = non_causal_loss_type(classes, class) {
                report.outcome = Outcome::Refused(Refusal::new(
                    ReasonCode::UnsupportedLoss,
                    report.line,
                    format!(
                        "__init__ sets `self.loss_type = {loss_type:?}`: `self.loss_function` is not the causal-LM loss"
                    ),
                ));
                report.head = Some(rewrite.head);
                return report;
            }
            let resolution = resolve_head(src, classes, class, &rewrite.head, 0);
            report.head_is_linear = match &resolution {
                HeadResolution::Linear => Some(true),
                HeadResolution::Unresolved => None,
                _ => Some(false),
            };
            if let Some(refusal) = epilogue_module_refusal(src, classes, class, &rewrite) {
                report.head = Some(rewrite.head);
                report.outcome = Outcome::Refused(refusal);
                return report;
            }
            report.epilogue = rewrite.epilogue;
            report.loss_form = Some(rewrite.loss_form);
            report.outcome = match resolution {
                HeadResolution::Linear => Outcome::Patched,
                HeadResolution::Composite(path) => {
                    report.head_path = path;
                    Outcome::Patched
                }
                HeadResolution::NotLinear(why) => Outcome::Refused(Refusal::new(
                    ReasonCode::HeadNotLinear,
                    report.line,
                    format!("`self.{}` {why}", rewrite.head),
                )),
                HeadResolution::Unresolved => Outcome::Refused(Refusal::new(
                    ReasonCode::HeadUnresolved,
                    report.line,
                    format!(
                        "`self.{}` is not assigned in an __init__ found in this file",
                        rewrite.head
                    ),
                )),
            };
            report.head = Some(rewrite.head);
        }
    }
    report
}
