//! `cargo run --release --example audit -- <transformers>/models`: prints one line per class and a summary.
use std::collections::BTreeMap;
use std::path::PathBuf;

use logitless_rewrite::{ClassKind, Outcome, audit_tree};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir: PathBuf = std::env::args()
        .nth(1)
        .ok_or("usage: audit <models dir>")?
        .into();
    let start = std::time::Instant::now();
    let reports = audit_tree(&dir)?;
    let elapsed = start.elapsed();
    let mut codes: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for r in &reports {
        let (status, code) = match &r.outcome {
            Outcome::Patched => ("patched", ""),
            Outcome::Refused(refusal) => ("refused", refusal.code.as_str()),
        };
        let reason = match &r.outcome {
            Outcome::Refused(refusal) => refusal.message.clone(),
            Outcome::Patched => r
                .epilogue
                .iter()
                .map(|e| format!("{}={}", e.kind.as_str(), e.expr))
                .collect::<Vec<_>>()
                .join(" "),
        };
        println!(
            "{:<48} {:<8} {:<24} {:<10} {}",
            r.class,
            status,
            code,
            r.head.as_deref().unwrap_or("-"),
            reason
        );
        *codes
            .entry((
                r.kind.as_str(),
                if code.is_empty() { "patched" } else { code },
            ))
            .or_default() += 1;
    }
    let causal = reports
        .iter()
        .filter(|r| r.kind == ClassKind::CausalLm)
        .count();
    println!("\n{causal} causal-lm classes; {elapsed:?}");
    for ((kind, code), n) in codes {
        println!("{kind:<24} {code:<28} {n}");
    }
    Ok(())
}
