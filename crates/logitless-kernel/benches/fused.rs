//! Criterion benchmark of the fused forward+backward at a small shape (256×512×8000), reported as throughput in
//! flops (6·N·H·V per call) for f32 and bf16, with and without threads. The full-size figures and the ratio to
//! GEMM come from `examples/throughput.rs` (bench/kernel.sh).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use half::bf16;
use logitless_kernel::{
    Element, GradScale, Grads, MatRef, Options, RowOutputs, fused_linear_cross_entropy,
};
use std::hint::black_box;

const N: usize = 256;
const H: usize = 512;
const V: usize = 8000;

fn bench_dtype<T: Element>(c: &mut Criterion, name: &str, make: fn(f32) -> T) {
    let x: Vec<T> = (0..N * H)
        .map(|i| make(((i % 101) as f32 - 50.0) / 50.0))
        .collect();
    let w: Vec<T> = (0..V * H)
        .map(|i| make(((i % 97) as f32 - 48.0) / 500.0))
        .collect();
    let targets: Vec<i64> = (0..N).map(|i| ((i * 7919) % V) as i64).collect();
    let mut dh = vec![make(0.0); N * H];
    let mut dw = vec![make(0.0); V * H];
    let mut group = c.benchmark_group(format!("fused_{name}"));
    group.throughput(Throughput::Elements((6 * N * H * V) as u64));
    group.sample_size(10);
    for parallel in [true, false] {
        let options = Options {
            parallel,
            ..Options::default()
        };
        group.bench_function(if parallel { "threads" } else { "one_thread" }, |b| {
            b.iter(|| {
                let r = fused_linear_cross_entropy(
                    MatRef::new(&x, N, H, H).expect("hidden"),
                    MatRef::new(&w, V, H, H).expect("weight"),
                    None,
                    &targets,
                    &options,
                    GradScale::Uniform(1.0 / N as f64),
                    RowOutputs::default(),
                    Grads {
                        d_hidden: Some(&mut dh),
                        d_weight: Some(&mut dw),
                        d_bias: None,
                    },
                );
                black_box(r.expect("kernel"))
            })
        });
    }
    group.finish();
}

fn fused(c: &mut Criterion) {
    bench_dtype::<f32>(c, "f32", |x| x);
    bench_dtype::<bf16>(c, "bf16", bf16::from_f32);
}

criterion_group!(benches, fused);
criterion_main!(benches);
