//! One fixture per accepted or refused shape (tests/fixtures/*.py, written in the shape of transformers'
//! forwards). Each file's first line states the expected outcome by hand (`# expect: patched` or
//! `# expect: refused <code>`); the full result is an insta snapshot under tests/snapshots/.

use std::fmt::Write as _;
use std::path::Path;

use logitless_rewrite::{Rewrite, RewriteOptions, rewrite_forward};

mod common;

fn render(r: &Rewrite) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "head: {}\nhidden: {}\nlogits: {}\nloss: {}\nlabels: {}",
        r.head, r.hidden, r.logits, r.loss, r.labels
    );
    let _ = writeln!(
        out,
        "vocab: {:?}\nloss_form: {}\nkwargs: {:?}",
        r.vocab,
        r.loss_form.as_str(),
        r.kwargs
    );
    if let Some(class) = &r.ce_class {
        let _ = writeln!(out, "ce_class: {class}");
    }
    if let Some(target) = &r.delegate_target {
        let _ = writeln!(out, "delegate_target: {target:?}");
    }
    // Shown when the labels do anything besides the loss (the usual case, nothing, prints nothing).
    match &r.labels_elsewhere {
        None => {
            let _ = writeln!(out, "labels elsewhere: unknown");
        }
        Some(e) if e.decoder_inputs || e.disables_cache || e.validates => {
            let _ = writeln!(
                out,
                "labels elsewhere: decoder_inputs={} disables_cache={} validates={}",
                e.decoder_inputs, e.disables_cache, e.validates
            );
        }
        Some(_) => {}
    }
    for step in &r.epilogue {
        let _ = writeln!(out, "epilogue: {} = {}", step.kind.as_str(), step.expr);
    }
    for (name, expr) in &r.extra_loss_kwargs {
        let _ = writeln!(out, "extra: {name} = {expr}");
    }
    for guard in &r.fused_guards {
        let _ = writeln!(out, "fused guard: {guard}");
    }
    let _ = write!(out, "---\n{}", r.source);
    out
}

#[test]
fn fixtures_match_expectations_and_snapshots() {
    let mut failures = Vec::new();
    for common::Fixture { name, text, expect } in common::fixtures("fixtures", 40) {
        let result = rewrite_forward(&text, &RewriteOptions::default());
        let (got, snapshot) = match &result {
            Ok(r) => ("patched".to_string(), render(r)),
            Err(refusal) => (format!("refused {}", refusal.code), format!("{refusal}\n")),
        };
        if got != expect {
            failures.push(format!(
                "{name}: expected `{expect}`, got `{got}`: {snapshot}"
            ));
        }
        insta::assert_snapshot!(name, snapshot);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The `--unreferenced reject` check without cargo-insta: every snapshot belongs to a fixture that still exists.
#[test]
fn no_snapshot_outlives_its_fixture() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let stale: Vec<String> = std::fs::read_dir(root.join("snapshots"))
        .expect("snapshots dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|name| {
            // `fixtures__<name>.snap` (tests/fixtures.rs), `heads__<name>.snap` (tests/heads.rs) and
            // `epilogue_modules__<name>.snap` (tests/epilogue_modules.rs).
            let found = [
                ("fixtures__", "fixtures"),
                ("heads__", "head_fixtures"),
                ("epilogue_modules__", "module_fixtures"),
            ]
            .iter()
            .any(|(prefix, dir)| {
                name.strip_prefix(prefix)
                    .and_then(|n| n.strip_suffix(".snap"))
                    .is_some_and(|f| root.join(dir).join(format!("{f}.py")).is_file())
            });
            !found
        })
        .collect();
    assert!(
        stale.is_empty(),
        "snapshots without a fixture (or pending files): {stale:?}"
    );
}
