//! bf16 GEMMs on AMX tiles (Intel Sapphire Rapids and later): `tdpbf16ps` multiplies a 16×32 bf16 tile by a
//! 32×16 one into 16×16 f32, the work of 16 `vdpbf16ps`. The same three products as [`crate::dpbf16`], which hands
//! them here when its token carries the AMX proof ([`crate::isa::Isa::Amx`]); the arithmetic is the same (bf16
//! products, exact in f32, summed in f32), only the order of the f32 sums differs.
//!
//! Every product runs on 32×32 blocks of C in four tiles (tmm0-3), from two A tiles (tmm4/5: 16 rows × 32 bf16,
//! k contiguous) and two B tiles (tmm6/7: 16 k-pairs × 16 columns of `(x[k], x[k+1])` pairs, the panel layout
//! [`crate::dpbf16`] packs, padded to whole steps of 32 k). A tile load reads 16 rows at a stride and has no mask, so
//! both operands are packed into zero-padded blocks (A as `[steps][32 rows][16 pairs]`, each tile load then 2 KiB
//! in one piece); C is loaded and stored in place for whole blocks, through a scratch block at the edges and
//! for the split weight-gradient accumulator.
//!
//! The instructions are inline assembly (the AMX intrinsics are not stable Rust) naming fixed tile registers.
//! Tiles are per-thread state that nothing else in this crate uses: [`Tiles`] configures them on the thread that
//! runs a piece of work and releases them when the piece ends.

use crate::dpbf16::{
    NR, PIECES_PER_THREAD, SharedMut, Target, WeightAcc, ceil_div, padded_pairs, split,
    split_d_hidden,
};
use crate::isa::AmxToken;
use crate::{holds, holds_view};
use half::bf16;
use std::arch::asm;
use std::arch::x86_64::*;
use std::marker::PhantomData;

/// Rows and columns of C per block: two tiles of 16 each way.
const BLOCK: usize = 32;
/// u32 pairs per k-step of a B panel (16 k-pairs × 32 columns) and of an A block (32 rows × 16 k-pairs).
const B_STEP: usize = 16 * NR;
const A_STEP: usize = BLOCK * 16;

/// A tile configuration (palette 1), laid out as `ldtilecfg` reads it.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

/// Tiles 0-7 each 16 rows of 64 bytes (16 f32, 32 bf16 or 16 bf16 pairs).
static CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    bytes_per_row: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// The tile registers, configured on the current thread for this value's life (not `Send`: the configuration is
/// the thread's). Released on drop, so the thread's next context switch does not save 8 KiB of tile data.
pub(crate) struct Tiles(PhantomData<*const ()>);

impl Tiles {
    pub(crate) fn new(_cpu: AmxToken) -> Self {
        // SAFETY: the token proves AMX-TILE is present and granted to this process; CONFIG is a valid palette-1
        // configuration (8 tiles of 16 × 64 bytes, reserved bytes zero) in a 64-byte aligned static.
        unsafe { asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly)) };
        Self(PhantomData)
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: the tiles were configured by `new` on this thread (the value cannot leave it); releasing them
        // only returns the tile state to its initial, unconfigured form.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// A 32×32 f32 block of C outside the destination (at its edges), 64-byte aligned for the tile stores.
#[repr(C, align(64))]
struct Scratch([f32; BLOCK * BLOCK]);

impl Scratch {
    fn new() -> Box<Self> {
        Box::new(Self([0.0; BLOCK * BLOCK]))
    }
    fn ptr(&mut self) -> *mut f32 {
        self.0.as_mut_ptr()
    }
    fn row(&self, i: usize, cols: usize) -> &[f32] {
        &self.0[i * BLOCK..i * BLOCK + cols]
    }
}

/// `C = [C +] Σ_s A_s·B_s` on one 32×32 block over `steps` steps of 32 k. A: a block as [`pack_a`] lays it out
/// (step s at u32 512·s, 64 bytes per row). B: a panel as [`crate::dpbf16`] packs it (128 bytes per k-pair),
/// step s at byte 2048·s. C: 32 rows of 32 f32 `ldc` bytes apart, read first when `accumulate`, else zero.
///
/// # Safety
/// `_tiles` lives on this thread; 2048·steps bytes at each of `a` and `b` are readable; 32 rows of 128 bytes at
/// `c` (stride `ldc`) are writable, and readable when accumulating, and no other thread touches them meanwhile.
unsafe fn block(
    _tiles: &Tiles,
    steps: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let c = c.cast::<u8>();
    let c_low = c.wrapping_add(16 * ldc);
    let (a, b) = (a.cast::<u8>(), b.cast::<u8>());
    let a_low = a.wrapping_add(16 * 64);
    // SAFETY: the addresses are those of the function's contract; the tile registers are configured on this
    // thread (`_tiles`), as 16 rows of 64 bytes each.
    unsafe {
        if accumulate {
            asm!(
                "tileloadd tmm0, [{c} + {ldc}*1]",
                "tileloadd tmm1, [{c} + {ldc}*1 + 64]",
                "tileloadd tmm2, [{d} + {ldc}*1]",
                "tileloadd tmm3, [{d} + {ldc}*1 + 64]",
                c = in(reg) c,
                d = in(reg) c_low,
                ldc = in(reg) ldc,
                options(nostack, readonly),
            );
        } else {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
        }
        for s in 0..steps {
            asm!(
                // Each product issued as soon as its operands are loaded, so loads overlap the tile unit
                // (about 1.3x the rate of four loads then four products, on L1-resident operands here).
                "tileloadd tmm4, [{a} + {lda}*1]",
                "tileloadd tmm6, [{b} + {bs}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b} + {bs}*1 + 64]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{e} + {lda}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a = in(reg) a.wrapping_add(4 * A_STEP * s),
                e = in(reg) a_low.wrapping_add(4 * A_STEP * s),
                b = in(reg) b.wrapping_add(4 * B_STEP * s),
                lda = in(reg) 64usize,
                bs = in(reg) 4 * NR,
                options(nostack, readonly),
            );
        }
        asm!(
            "tilestored [{c} + {ldc}*1], tmm0",
            "tilestored [{c} + {ldc}*1 + 64], tmm1",
            "tilestored [{d} + {ldc}*1], tmm2",
            "tilestored [{d} + {ldc}*1 + 64], tmm3",
            c = in(reg) c,
            d = in(reg) c_low,
            ldc = in(reg) ldc,
            options(nostack),
        );
    }
}

/// The 16×16 transpose of u32 lanes: `out[c]` lane `i` is `r[i]` lane `c` (four rounds of shuffles).
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) fn transpose16(r: &[__m512i; 16]) -> [__m512i; 16] {
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    // Within each 128-bit lane L, u[4i + m] now holds column 4L + m of rows 4i..4i + 4.
    let mut u = [_mm512_setzero_si512(); 16];
    for i in 0..4 {
        u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    let mut out = [_mm512_setzero_si512(); 16];
    for m in 0..4 {
        let v0 = _mm512_shuffle_i32x4::<0x44>(u[m], u[4 + m]);
        let v1 = _mm512_shuffle_i32x4::<0xEE>(u[m], u[4 + m]);
        let w0 = _mm512_shuffle_i32x4::<0x44>(u[8 + m], u[12 + m]);
        let w1 = _mm512_shuffle_i32x4::<0xEE>(u[8 + m], u[12 + m]);
        out[m] = _mm512_shuffle_i32x4::<0x88>(v0, w0);
        out[4 + m] = _mm512_shuffle_i32x4::<0xDD>(v0, w0);
        out[8 + m] = _mm512_shuffle_i32x4::<0x88>(v1, w1);
        out[12 + m] = _mm512_shuffle_i32x4::<0xDD>(v1, w1);
    }
    out
}

/// Up to 32 bf16 of `src` from `start` (fewer where it ends; zero past that) as 16 u32 pairs.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
fn load_pairs(src: &[u16], start: usize) -> __m512i {
    let n = src.len().saturating_sub(start).min(32);
    let mask: __mmask32 = if n == 32 { !0 } else { (1u32 << n) - 1 };
    // SAFETY: the mask covers only elements start..start + n, which lie in `src`; masked-off elements are neither
    // read nor fault.
    unsafe { _mm512_maskz_loadu_epi16(mask, src.as_ptr().wrapping_add(start).cast()) }
}

/// Packs `count` (<= 32) k-contiguous rows of bf16 bits, `k` values each, as one B panel: `[padded_pairs(k)][32]`
/// pairs `(row_j[2p], row_j[2p+1])`, zero past `k` and past `count` (16×16 transposes of the rows' pairs).
#[target_feature(enable = "avx512f,avx512bw")]
fn pack_panel<'a>(row: impl Fn(usize) -> &'a [u16], count: usize, k: usize, out: &mut [u32]) {
    let steps = padded_pairs(k) / 16;
    assert!(out.len() >= steps * B_STEP, "pack_panel");
    let rows: [&[u16]; BLOCK] = std::array::from_fn(|j| if j < count { &row(j)[..k] } else { &[] });
    for s in 0..steps {
        for half in 0..2 {
            let mut r = [_mm512_setzero_si512(); 16];
            for (i, lanes) in r.iter_mut().enumerate() {
                *lanes = load_pairs(rows[16 * half + i], 32 * s);
            }
            for (p, lanes) in transpose16(&r).iter().enumerate() {
                let at = (16 * s + p) * NR + 16 * half;
                // SAFETY: u32 at..at + 16 lie in `out` (asserted: at + 16 <= steps·512).
                unsafe { _mm512_storeu_si512(out.as_mut_ptr().add(at).cast(), *lanes) };
            }
        }
    }
}

/// Packs `count` (<= 32) k-contiguous rows of bf16 bits, `k` values each, as one A block: `[steps][32 rows][16
/// pairs]`, so that every tile load reads 2 KiB in one piece (rows read in place at a power-of-two stride would
/// fall into a few cache sets); zero past `k` and past `count`. `out` holds `padded_pairs(k)·32` u32.
#[target_feature(enable = "avx512f,avx512bw")]
fn pack_a<'a>(row: impl Fn(usize) -> &'a [u16], count: usize, k: usize, out: &mut [u32]) {
    let steps = padded_pairs(k) / 16;
    assert!(out.len() >= steps * A_STEP, "pack_a");
    for i in 0..BLOCK {
        let src: &[u16] = if i < count { &row(i)[..k] } else { &[] };
        for s in 0..steps {
            let at = s * A_STEP + 16 * i;
            // SAFETY: u32 at..at + 16 lie in `out` (asserted).
            unsafe {
                _mm512_storeu_si512(out.as_mut_ptr().add(at).cast(), load_pairs(src, 32 * s))
            };
        }
    }
}

/// `n` (<= 16) bf16 bits of row `r` of `g` (`gs` apart) from column `u0`, widened to u32 lanes; zero lanes past
/// `n`, and all zero for a row past `rows`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
fn column(g: &[u16], gs: usize, rows: usize, r: usize, u0: usize, n: usize) -> __m512i {
    if r >= rows || n == 0 {
        return _mm512_setzero_si512();
    }
    let src = &g[r * gs + u0..r * gs + u0 + n];
    let mask: __mmask16 = if n == 16 { !0 } else { (1u16 << n) - 1 };
    // SAFETY: the mask covers the n elements of `src` only; masked-off elements are neither read nor fault.
    _mm512_cvtepu16_epi32(unsafe { _mm256_maskz_loadu_epi16(mask, src.as_ptr().cast()) })
}

/// Packs the 32-wide vocabulary block at column `u0` (`nv` <= 32 columns) of `rows` rows of bf16 bits (`gs`
/// apart) as one A block whose rows are the vocabulary and whose k runs along `g`'s rows: pair `(g[2p][u],
/// g[2p+1][u])`, zero past `rows` and `nv`. `out` holds `padded_pairs(rows)·32` u32.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn pack_columns(g: &[u16], gs: usize, rows: usize, u0: usize, nv: usize, out: &mut [u32]) {
    let steps = padded_pairs(rows) / 16;
    assert!(
        out.len() >= steps * A_STEP && (rows == 0 || u0 + nv <= gs),
        "pack_columns"
    );
    for s in 0..steps {
        for half in 0..2 {
            // Pair p of this step, as 16 lanes over the block's vocabulary columns 16·half.. (a loop, not a
            // closure: the widening loads then inline with this function's target features).
            let (c0, n) = (u0 + 16 * half, nv.saturating_sub(16 * half).min(16));
            let mut r = [_mm512_setzero_si512(); 16];
            for (p, lanes) in r.iter_mut().enumerate() {
                let k = 2 * (16 * s + p);
                let (lo, hi) = (
                    column(g, gs, rows, k, c0, n),
                    column(g, gs, rows, k + 1, c0, n),
                );
                *lanes = _mm512_or_si512(lo, _mm512_slli_epi32::<16>(hi));
            }
            for (i, lanes) in transpose16(&r).iter().enumerate() {
                let at = s * A_STEP + 16 * (16 * half + i);
                // SAFETY: u32 at..at + 16 lie in `out` (asserted).
                unsafe { _mm512_storeu_si512(out.as_mut_ptr().add(at).cast(), *lanes) };
            }
        }
    }
}

/// bf16 values as their bits.
fn bits(x: &[bf16]) -> &[u16] {
    use half::slice::HalfFloatSliceExt;
    x.reinterpret_cast()
}

/// The A operand of the logits product: the `rows` gathered hidden rows in blocks of 32 as [`pack_a`] lays them
/// out, `padded_pairs(h)·32` u32 per block.
pub(crate) fn pack_rows<'a>(
    _cpu: AmxToken,
    row: impl Fn(usize) -> &'a [bf16],
    rows: usize,
    h: usize,
    out: &mut Vec<u32>,
) {
    let per_block = padded_pairs(h) * BLOCK;
    out.clear();
    out.resize(ceil_div(rows, BLOCK) * per_block, 0);
    for (rb, dst) in out.chunks_mut(per_block).enumerate() {
        let r0 = rb * BLOCK;
        // SAFETY: the AMX token implies avx512f/bw (`isa::Level::bf16`).
        unsafe { pack_a(|i| bits(row(r0 + i)), BLOCK.min(rows - r0), h, dst) };
    }
}

/// Copies `rows × cols` of a scratch block into row-major `c` (`ldc` elements between rows), adding when asked.
///
/// # Safety
/// `c + i·ldc + j` must be writable for i < rows, j < cols, and not touched by another thread meanwhile.
unsafe fn store_edge(tile: &Scratch, c: *mut f32, ldc: usize, rows: usize, cols: usize, add: bool) {
    for i in 0..rows {
        // SAFETY: by the function's contract, row i's `cols` elements are ours.
        let dst = unsafe { std::slice::from_raw_parts_mut(c.add(i * ldc), cols) };
        if add {
            for (d, s) in dst.iter_mut().zip(tile.row(i, cols)) {
                *d += s;
            }
        } else {
            dst.copy_from_slice(tile.row(i, cols));
        }
    }
}

/// [`block`] into the `rows × cols` (each <= 32) corner of row-major `c` (`ldc` elements between rows), added to it
/// when `add`: straight from the tiles for a whole 32×32 block, through `tile` at the edges.
///
/// # Safety
/// As [`block`] for A and B; `c + i·ldc + j` must be writable (and readable when adding) for i < rows, j < cols,
/// and not touched by another thread meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn block_into(
    tiles: &Tiles,
    steps: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    (rows, cols): (usize, usize),
    add: bool,
    tile: &mut Scratch,
) {
    // SAFETY: by the function's contract (a whole block's 32 rows of 32 f32 are in `c`; the scratch block is ours).
    unsafe {
        if rows == BLOCK && cols == BLOCK {
            block(tiles, steps, a, b, c, 4 * ldc, add);
        } else {
            block(tiles, steps, a, b, tile.ptr(), 4 * BLOCK, false);
            store_edge(tile, c, ldc, rows, cols, add);
        }
    }
}

/// Bytes of packed operand a thread keeps for reuse (a group of B panels, or of A blocks): about a quarter of
/// a Sapphire Rapids core's 2 MiB L2, so the other operand's stream and C fit beside it.
const GROUP_BYTES: usize = 512 << 10;

/// How many packed blocks of `u32s` u32 make one group (at least one).
fn group_of(u32s: usize) -> usize {
    (GROUP_BYTES / (4 * u32s)).max(1)
}

/// GEMM 1 on tiles: `out[j, u] = Σ_k hidden_j[k] · W[u, k]` for j < rows, u < v, with the hidden rows packed by
/// [`pack_rows`] and W's rows (`ws` apart) packed here as B panels of 32, a group at a time, each group then
/// swept by every block of rows (the rows stream once per group, the group stays in L2).
#[allow(clippy::too_many_arguments)]
pub(crate) fn logits(
    cpu: AmxToken,
    w: &[bf16],
    ws: usize,
    v: usize,
    h: usize,
    hp: &[u32],
    rows: usize,
    out: &mut [f32],
    parallel: bool,
) {
    let kw = padded_pairs(h);
    let steps = kw / 16;
    let per_block = kw * BLOCK;
    let row_blocks = ceil_div(rows, BLOCK);
    assert!(holds_view(w.len(), v, h, ws), "logits: weight");
    assert!(
        holds(hp.len(), row_blocks, per_block) && holds(out.len(), rows, v),
        "logits: buffers"
    );
    let dst = SharedMut(out.as_mut_ptr());
    let group = group_of(per_block) * BLOCK;
    split(parallel, v, BLOCK, PIECES_PER_THREAD, |v_start, v_end| {
        let tiles = Tiles::new(cpu);
        let mut panels =
            vec![0u32; per_block * group_of(per_block).min(ceil_div(v_end - v_start, BLOCK))];
        let mut tile = Scratch::new();
        for g0 in (v_start..v_end).step_by(group) {
            let g_end = v_end.min(g0 + group);
            for (u0, panel) in (g0..g_end).step_by(BLOCK).zip(panels.chunks_mut(per_block)) {
                // SAFETY: the AMX token implies avx512f/bw (`isa::Level::bf16`).
                unsafe {
                    pack_panel(
                        |j| bits(&w[(u0 + j) * ws..]),
                        BLOCK.min(g_end - u0),
                        h,
                        panel,
                    )
                };
            }
            for rb in 0..row_blocks {
                let (r0, nrows) = (rb * BLOCK, BLOCK.min(rows - rb * BLOCK));
                let a = hp[rb * per_block..].as_ptr();
                for (u0, panel) in (g0..g_end).step_by(BLOCK).zip(panels.chunks(per_block)) {
                    let cols = BLOCK.min(g_end - u0);
                    // SAFETY: A is row block rb of `hp` and B one packed panel, `steps` steps each (asserted and
                    // sized above); C's rows r0.. < rows and columns u0.. < v_end lie in `out` (asserted), and
                    // this thread owns columns [v_start, v_end).
                    unsafe {
                        block_into(
                            &tiles,
                            steps,
                            a,
                            panel.as_ptr(),
                            dst.at(r0 * v + u0),
                            v,
                            (nrows, cols),
                            false,
                            &mut tile,
                        )
                    };
                }
            }
        }
    });
}

/// k-pairs per packed block of d_hidden's vocabulary: 256 pairs × 32 lanes × 4 bytes = 32 KiB per B panel.
const K_PAIRS: usize = 256;

/// GEMM 2 on tiles: `dh[j, :] = Σ_u g[j, u] · W[u, :]` for j < rows, `g` rounded to bf16 (row stride `gs` >= v),
/// W's rows `ws` apart. Blocks of `2·K_PAIRS` vocabulary rows of W are packed per thread as B panels over its
/// columns of H; each block of 32 gradient rows is packed as one A block and swept across them.
#[allow(clippy::too_many_arguments)]
pub(crate) fn d_hidden(
    cpu: AmxToken,
    g: &[u16],
    gs: usize,
    rows: usize,
    w: &[bf16],
    ws: usize,
    v: usize,
    h: usize,
    dh: &mut [f32],
    parallel: bool,
) {
    assert!(
        gs >= v && holds(g.len(), rows, gs) && holds(dh.len(), rows, h),
        "d_hidden: buffers"
    );
    assert!(holds_view(w.len(), v, h, ws), "d_hidden: weight");
    let k_block = 2 * K_PAIRS;
    split_d_hidden(
        parallel,
        rows,
        v,
        h,
        k_block,
        BLOCK,
        dh,
        |(k_start, k_end), (h_start, h_end), dst| {
            let tiles = Tiles::new(cpu);
            let mut bp = Vec::new();
            let mut ablk = vec![0u32; BLOCK * K_PAIRS];
            let mut tile = Scratch::new();
            for k0 in (k_start..k_end).step_by(k_block) {
                let kc = k_block.min(k_end - k0);
                let kp = padded_pairs(kc);
                let steps = kp / 16;
                let wrow = |k: usize| &w[(k0 + k) * ws..(k0 + k) * ws + h];
                // SAFETY: AMX's token implies AVX512_BF16 and so avx512f/bw/vl (`isa::Level::bf16`).
                let per_panel =
                    unsafe { crate::dpbf16::pack_kmajor(&wrow, kc, h_start, h_end, &mut bp) };
                for r0 in (0..rows).step_by(BLOCK) {
                    let nrows = BLOCK.min(rows - r0);
                    let ablk = &mut ablk[..kp * BLOCK];
                    // SAFETY: the AMX token implies avx512f/bw (`isa::Level::bf16`).
                    unsafe { pack_a(|i| &g[(r0 + i) * gs + k0..], nrows, kc, ablk) };
                    for (q, h0) in (h_start..h_end).step_by(BLOCK).enumerate() {
                        let cols = BLOCK.min(h_end - h0);
                        let b = bp[q * per_panel..].as_ptr();
                        // SAFETY: A is `ablk` and B panel q of `bp`, `kp` pairs each; C's rows r0.. < rows and
                        // columns h0.. < h_end lie in `dh` (asserted), and this thread owns [h_start, h_end).
                        unsafe {
                            block_into(
                                &tiles,
                                steps,
                                ablk.as_ptr(),
                                b,
                                dst.at(r0 * h + h0),
                                h,
                                (nrows, cols),
                                k0 > k_start,
                                &mut tile,
                            )
                        };
                    }
                }
            }
        },
    );
}

/// GEMM 3 on tiles: `dw[u, :] += Σ_j g[j, u] · hidden_j` for u < v, `g` rounded to bf16 (row stride `gs`), the
/// hidden rows packed by [`crate::dpbf16::pack_hidden_for_dweight`] from the same `rows` rows. A group of 32-wide
/// vocabulary blocks of g is packed as A blocks (a transpose), then each B panel sweeps the group.
#[allow(clippy::too_many_arguments)]
pub(crate) fn d_weight(
    cpu: AmxToken,
    g: &[u16],
    gs: usize,
    rows: usize,
    v: usize,
    h: usize,
    hp: &[u32],
    dw: WeightAcc<'_>,
    parallel: bool,
) {
    let kp = padded_pairs(rows);
    let steps = kp / 16;
    let per_panel = kp * NR;
    let per_block = kp * BLOCK;
    let panels = ceil_div(h, NR);
    assert!(
        gs >= v && holds(g.len(), rows, gs) && holds(hp.len(), panels, per_panel),
        "d_weight"
    );
    let dst = dw.target(v, h);
    let group = group_of(per_block) * BLOCK;
    split(parallel, v, BLOCK, PIECES_PER_THREAD, |v_start, v_end| {
        let tiles = Tiles::new(cpu);
        let mut ap =
            vec![0u32; per_block * group_of(per_block).min(ceil_div(v_end - v_start, BLOCK))];
        let mut tile = Scratch::new();
        for g0 in (v_start..v_end).step_by(group) {
            let g_end = v_end.min(g0 + group);
            // A: each block's 32 vocabulary columns of g as rows, k-pairs along g's rows (a transpose).
            for (u0, blk) in (g0..g_end).step_by(BLOCK).zip(ap.chunks_mut(per_block)) {
                // SAFETY: the AMX token implies avx512f/bw (`isa::Level::bf16`).
                unsafe { pack_columns(g, gs, rows, u0, BLOCK.min(g_end - u0), blk) };
            }
            for q in 0..panels {
                let h0 = q * NR;
                let cols = NR.min(h - h0);
                let b = hp[q * per_panel..].as_ptr();
                for (u0, blk) in (g0..g_end).step_by(BLOCK).zip(ap.chunks(per_block)) {
                    let nv = BLOCK.min(g_end - u0);
                    let (a, c) = (blk.as_ptr(), u0 * h + h0);
                    match dst {
                        // SAFETY: A is one packed block and B panel q of `hp`, `kp` pairs each (asserted); C's
                        // rows u0.. < v_end and columns h0.. < h lie in the accumulator (asserted), and this
                        // thread owns rows [v_start, v_end).
                        Target::F32(d) => unsafe {
                            block_into(&tiles, steps, a, b, d.at(c), h, (nv, cols), true, &mut tile)
                        },
                        // The split planes cannot be tile-loaded: through the scratch block.
                        Target::Split(d) => {
                            // SAFETY: as above for A and B.
                            unsafe { block(&tiles, steps, a, b, tile.ptr(), 4 * BLOCK, false) };
                            for i in 0..nv {
                                // SAFETY: as above, in both planes of the split accumulator; AMX's token
                                // implies avx512f/bw.
                                unsafe { d.at(c + i * h).add_row(tile.row(i, cols)) };
                            }
                        }
                    }
                }
            }
        }
    });
}
