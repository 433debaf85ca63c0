//! Throughput of the fused forward+backward against a plain GEMM of the same size, in one run.
//!
//! `cargo run --release -p logitless-kernel --example throughput -- [N H V [dtype [reps [fused-only]]]]`
//! (defaults 2048 1024 32000 f32 3; dtype f32 | bf16 | f16 | f64). Prints GFLOP/s of the fused call (6·N·H·V
//! flops: forward, d_hidden, d_weight), the best GEMM rate we reach for this dtype (the three GEMM shapes the
//! kernel performs, each timed alone at full size, at most 2048 rows: for f32 the faster of the `gemm` crate and
//! the kernel's AVX-512 engine, for bf16 the kernel's AVX512_BF16 engine), their ratio, and the peak memory the
//! fused call allocated beyond its inputs and outputs (for bf16/f16 this includes the V×H f32 d_weight
//! accumulator). Each engine also prints its three products' rates.

use half::{bf16, f16};
use logitless_kernel::{
    Element, GradScale, Grads, MatRef, Options, RowOutputs, WeightGrad, fused_linear_cross_entropy,
};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// Counts live heap bytes and their high-water mark.
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only bookkeeping is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

trait Bench: Element {
    fn make(x: f32) -> Self;
    /// Seconds for the three GEMM shapes of the kernel with the engine it uses for this dtype.
    fn gemm_seconds(n: usize, h: usize, v: usize, reps: usize) -> f64;
}

/// This process's user+system CPU seconds (Linux /proc; NaN elsewhere). On a shared machine, flops per CPU-second
/// shows the kernel's own efficiency when other jobs steal cores from the wall-clock figure.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|x| x.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    // Fields 14 and 15 of stat (utime, stime) are 11 and 12 after the command name; 100 ticks per second.
    (ticks(11) + ticks(12)) / 100.0
}

fn best_of(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// `dst = lhs·rhs` on the f32/f64 engine (strides in elements, as the `gemm` crate takes them).
#[allow(clippy::too_many_arguments)]
fn engine<T: 'static + Copy>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    (dst_rs, dst_cs): (usize, usize),
    lhs: &[T],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[T],
    (rhs_rs, rhs_cs): (usize, usize),
    zero: T,
    one: T,
) {
    let end = |r: usize, c: usize, rs: usize, cs: usize| (r - 1) * rs + (c - 1) * cs + 1;
    assert!(dst.len() >= end(m, n, dst_rs, dst_cs) && lhs.len() >= end(m, k, lhs_rs, lhs_cs));
    assert!(rhs.len() >= end(k, n, rhs_rs, rhs_cs));
    let par = gemm::Parallelism::Rayon(rayon::current_num_threads());
    let s = |x: usize| x as isize;
    // SAFETY: the asserts keep every addressed element inside its slice; dst is exclusively borrowed; T is f32
    // or f64 at every call site.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            s(dst_cs),
            s(dst_rs),
            false,
            lhs.as_ptr(),
            s(lhs_cs),
            s(lhs_rs),
            rhs.as_ptr(),
            s(rhs_cs),
            s(rhs_rs),
            zero,
            one,
            false,
            false,
            false,
            par,
        )
    }
}

/// Seconds of the kernel's three products at full size on the f32/f64 engine: N×V = N×H·(V×H)ᵀ,
/// N×H = N×V·V×H, V×H = (N×V)ᵀ·N×H.
fn three_gemms<T: 'static + Copy + Send + Sync>(
    n: usize,
    h: usize,
    v: usize,
    reps: usize,
    zero: T,
    one: T,
    x: T,
) -> f64 {
    let hid = vec![x; n * h];
    let w = vec![x; v * h];
    let mut logits = vec![zero; n * v];
    let mut dh = vec![zero; n * h];
    let mut dw = vec![zero; v * h];
    best_of(reps, || {
        engine(
            (n, v, h),
            &mut logits,
            (v, 1),
            &hid,
            (h, 1),
            &w,
            (1, h),
            zero,
            one,
        )
    }) + best_of(reps, || {
        engine(
            (n, h, v),
            &mut dh,
            (h, 1),
            &logits,
            (v, 1),
            &w,
            (h, 1),
            zero,
            one,
        )
    }) + best_of(reps, || {
        engine(
            (v, h, n),
            &mut dw,
            (h, 1),
            &logits,
            (1, v),
            &hid,
            (h, 1),
            zero,
            one,
        )
    })
}

/// Prints each product's rate (2·N·H·V flops each) on one line.
fn print_parts(engine: &str, n: usize, h: usize, v: usize, t: [f64; 3]) {
    let rate = |s: f64| 2.0 * (n * h * v) as f64 / s / 1e9;
    println!(
        "{engine} N={n}: logits {:.1}, d_hidden {:.1}, d_weight {:.1} GFLOP/s",
        rate(t[0]),
        rate(t[1]),
        rate(t[2])
    );
}

fn three_gemms_f32(n: usize, h: usize, v: usize, reps: usize) -> f64 {
    three_gemms(n, h, v, reps, 0.0f32, 1.0, 0.01)
}

impl Bench for f32 {
    fn make(x: f32) -> Self {
        x
    }
    fn gemm_seconds(n: usize, h: usize, v: usize, reps: usize) -> f64 {
        // The faster of the two f32 engines here: the `gemm` crate and the kernel's own AVX-512 one.
        let ours = logitless_kernel::bench_support::f32_gemm_seconds(n, h, v, reps).map(|t| {
            print_parts("f32 engine", n, h, v, t);
            t.iter().sum::<f64>()
        });
        three_gemms_f32(n, h, v, reps).min(ours.unwrap_or(f64::INFINITY))
    }
}
impl Bench for f64 {
    fn make(x: f32) -> Self {
        x as f64
    }
    fn gemm_seconds(n: usize, h: usize, v: usize, reps: usize) -> f64 {
        three_gemms(n, h, v, reps, 0.0f64, 1.0, 0.01)
    }
}
impl Bench for bf16 {
    fn make(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn gemm_seconds(n: usize, h: usize, v: usize, reps: usize) -> f64 {
        // The AVX512_BF16 engine's own GEMMs where the kernel uses it; elsewhere bf16 runs on the f32 engine.
        match logitless_kernel::bench_support::bf16_gemm_seconds(n, h, v, reps) {
            Some(t) => {
                print_parts("bf16 engine", n, h, v, t);
                t.iter().sum()
            }
            None => three_gemms_f32(n, h, v, reps),
        }
    }
}
impl Bench for f16 {
    fn make(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn gemm_seconds(n: usize, h: usize, v: usize, reps: usize) -> f64 {
        three_gemms_f32(n, h, v, reps)
    }
}

fn run<T: Bench>(n: usize, h: usize, v: usize, reps: usize) {
    // Deterministic, varied data (a cheap hash), scaled like a trained head.
    let val =
        |i: usize, s: f32| T::make(((i.wrapping_mul(2654435761) % 1000) as f32 / 500.0 - 1.0) * s);
    let hid: Vec<T> = (0..n * h).map(|i| val(i, 1.0)).collect();
    let w: Vec<T> = (0..v * h).map(|i| val(i + 7, 0.05)).collect();
    let targets: Vec<i64> = (0..n).map(|i| ((i * 7919) % v) as i64).collect();
    let mut dh = vec![T::make(0.0); n * h];
    let mut dw = vec![T::make(0.0); v * h];
    // THROUGHPUT_BUDGET_MB (MiB) overrides the kernel's default chunk budget.
    let budget_mb: Option<usize> = std::env::var("THROUGHPUT_BUDGET_MB")
        .ok()
        .and_then(|s| s.parse().ok());
    let defaults = Options::default();
    // THROUGHPUT_WEIGHT_GRAD=recompute: the bf16/f16 weight gradient in a slab pass, without the V×H accumulator.
    let weight_grad = match std::env::var("THROUGHPUT_WEIGHT_GRAD").as_deref() {
        Ok("recompute") => WeightGrad::Recompute,
        _ => WeightGrad::Accumulate,
    };
    let options = Options {
        chunk_budget_bytes: budget_mb.map_or(defaults.chunk_budget_bytes, |mb| mb << 20),
        weight_grad,
        // THROUGHPUT_PROFILE=1: seconds per phase on stderr.
        profile: std::env::var_os("THROUGHPUT_PROFILE").is_some(),
        ..defaults
    };
    let flops = 6.0 * (n * h * v) as f64;
    let mut best = f64::INFINITY;
    let mut peak_extra = 0usize;
    let mut loss = 0.0;
    let mut best_cpu = f64::INFINITY;
    for _ in 0..reps {
        let cpu0 = cpu_seconds();
        let base = LIVE.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        let t = Instant::now();
        let s = fused_linear_cross_entropy(
            MatRef::new(&hid, n, h, h).expect("hidden"),
            MatRef::new(&w, v, h, h).expect("weight"),
            None,
            &targets,
            &options,
            GradScale::Uniform(1.0 / n as f64),
            RowOutputs::default(),
            Grads {
                d_hidden: Some(&mut dh),
                d_weight: Some(&mut dw),
                d_bias: None,
            },
        )
        .expect("kernel");
        best = best.min(t.elapsed().as_secs_f64());
        best_cpu = best_cpu.min(cpu_seconds() - cpu0);
        peak_extra = peak_extra.max(PEAK.load(Ordering::Relaxed) - base);
        loss = s.loss_sum / s.count as f64;
    }
    // `fused-only` as a 6th argument skips the GEMM reference (for profilers).
    let gemm = if std::env::args().nth(6).as_deref() == Some("fused-only") {
        f64::NAN
    } else {
        // The reference GEMMs materialise N×V: at most 2048 rows of it (rates per flop do not depend on N here).
        let n_ref = n.min(2048);
        T::gemm_seconds(n_ref, h, v, reps) * n as f64 / n_ref as f64
    };
    let dtype = format!("{:?}", T::DTYPE).to_lowercase();
    println!(
        "{dtype:>4} N={n} H={h} V={v} isa={:?} budget={} MiB weight_grad={weight_grad:?}: fused fwd+bwd {:.3} s = {:.1} GFLOP/s | 3 GEMMs {:.3} s = {:.1} GFLOP/s | \
         fused/3GEMM time ratio {:.2} (goal <= 1.25) | peak extra memory {:.1} MiB | fused {:.1} GFLOP per CPU-s on \
         {} threads | loss {loss:.4}",
        logitless_kernel::isa::current(),
        options.chunk_budget_bytes >> 20,
        best,
        flops / best / 1e9,
        gemm,
        flops / gemm / 1e9,
        best / gemm,
        peak_extra as f64 / (1 << 20) as f64,
        flops / best_cpu / 1e9,
        rayon::current_num_threads(),
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (n, h, v) = (num(0, 2048), num(1, 1024), num(2, 32000));
    let reps = num(4, 3);
    // THROUGHPUT_ISA=avx512bf16 (or any level below the detected one): the engines of that level, side by side.
    if let Ok(name) = std::env::var("THROUGHPUT_ISA") {
        match logitless_kernel::isa::Isa::parse(&name) {
            Some(level) => logitless_kernel::isa::set_override(Some(level)),
            None => return eprintln!("THROUGHPUT_ISA: unknown level {name:?}"),
        }
    }
    match args.get(3).map(String::as_str).unwrap_or("f32") {
        "f32" => run::<f32>(n, h, v, reps),
        "f64" => run::<f64>(n, h, v, reps),
        "bf16" => run::<bf16>(n, h, v, reps),
        "f16" => run::<f16>(n, h, v, reps),
        other => eprintln!("unknown dtype {other}: use f32, bf16, f16 or f64"),
    }
}
