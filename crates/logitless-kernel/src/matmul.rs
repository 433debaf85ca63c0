//! A bounds-checked face over the `gemm` crate (f32/f64, runtime SIMD dispatch, optional rayon parallelism).

use crate::storage::Real;

/// Element strides of a matrix view: element (i, j) is at `i·rs + j·cs`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Layout {
    pub rs: usize,
    pub cs: usize,
}

impl Layout {
    pub const fn row_major(row_stride: usize) -> Self {
        Self {
            rs: row_stride,
            cs: 1,
        }
    }
    /// The transpose of a row-major view with this row stride.
    pub const fn transposed(row_stride: usize) -> Self {
        Self {
            rs: 1,
            cs: row_stride,
        }
    }
    /// Elements the view addresses; `usize::MAX` when that overflows (no slice is that long).
    fn extent(self, rows: usize, cols: usize) -> usize {
        if rows == 0 || cols == 0 {
            return 0;
        }
        (rows - 1)
            .checked_mul(self.rs)
            .and_then(|r| (cols - 1).checked_mul(self.cs)?.checked_add(r))
            .and_then(|x| x.checked_add(1))
            .unwrap_or(usize::MAX)
    }
}

/// `dst (m×n) = [dst +] lhs (m×k) · rhs (k×n)`. Panics if a view reaches past its slice (callers derive the
/// views from validated shapes, so that would be a bug here, not bad input).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul<C: Real>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [C],
    dl: Layout,
    accumulate: bool,
    lhs: &[C],
    ll: Layout,
    rhs: &[C],
    rl: Layout,
    parallel: bool,
) {
    assert!(
        dst.len() >= dl.extent(m, n),
        "matmul: dst view out of bounds"
    );
    assert!(
        lhs.len() >= ll.extent(m, k),
        "matmul: lhs view out of bounds"
    );
    assert!(
        rhs.len() >= rl.extent(k, n),
        "matmul: rhs view out of bounds"
    );
    assert!(dl.rs != 0 || m <= 1 || n == 0, "matmul: aliased dst rows");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    dst[i * dl.rs + j * dl.cs] = C::ZERO;
                }
            }
        }
        return;
    }
    let parallelism = if parallel {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    let s = |x: usize| x as isize;
    // SAFETY: the asserts above keep every element the three views address inside their slices; dst is borrowed
    // mutably and so cannot alias lhs or rhs; C is f32 or f64, both supported by gemm (its `T` check).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            s(dl.cs),
            s(dl.rs),
            accumulate,
            lhs.as_ptr(),
            s(ll.cs),
            s(ll.rs),
            rhs.as_ptr(),
            s(rl.cs),
            s(rl.rs),
            C::ONE,
            C::ONE,
            false,
            false,
            false,
            parallelism,
        );
    }
}
