//! The one update primitive every stepper uses: `out = beta * out + sum_i c_i * x_i`.
//!
//! Steppers compute their coefficients in f64 on the host and hand them to [`Buffer::lincomb`]; the buffers
//! themselves may live anywhere. Host `Vec<f32>` / `Vec<f64>` implement it here; a device buffer implements it
//! with the runtime's fused linear-combination kernel, so the sampler code path is the same on CPU and GPU.
use anyhow::{Result, bail};

/// Most inputs one fused call takes; longer combinations are split into chained calls with `beta = 1`.
pub const MAX_TERMS: usize = 8;

/// A same-shaped numeric buffer the samplers can update.
pub trait Buffer: Sized {
    /// Number of elements.
    fn len(&self) -> usize;
    /// True when the buffer holds no elements.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// A new zeroed buffer of the same shape and placement.
    fn alloc_like(&self) -> Result<Self>;
    /// `self = beta * self + sum c_i * x_i` with at most [`MAX_TERMS`] terms. With `beta == 0` the old
    /// contents are not read (so uninitialised or NaN contents do not leak into the result).
    fn lincomb_raw(&mut self, beta: f64, terms: &[(f64, &Self)]) -> Result<()>;
    /// Fill with standard normal noise from Philox4x32-10 (see [`crate::samplers::noise`] for the exact
    /// counter/key layout and transform that a device implementation must reproduce).
    fn fill_normal(&mut self, seed: u64, stream: u64) -> Result<()>;
    /// Copy of the values as f64 on the host (for checks, dumps and tests; not on the hot path).
    fn to_host_f64(&self) -> Result<Vec<f64>>;
    /// Set the values from host f64 (rounded to the buffer's precision).
    fn set_from_f64(&mut self, v: &[f64]) -> Result<()>;

    /// `self = beta * self + sum c_i * x_i`, any number of terms (chained [`Buffer::lincomb_raw`] calls).
    fn lincomb(&mut self, beta: f64, terms: &[(f64, &Self)]) -> Result<()> {
        for t in terms {
            if t.1.len() != self.len() {
                bail!(
                    "lincomb: input of {} elements for an output of {}",
                    t.1.len(),
                    self.len()
                );
            }
        }
        if terms.len() <= MAX_TERMS {
            return self.lincomb_raw(beta, terms);
        }
        let (head, tail) = terms.split_at(MAX_TERMS);
        self.lincomb_raw(beta, head)?;
        self.lincomb(1.0, tail)
    }
    /// `self = src`.
    fn copy_from(&mut self, src: &Self) -> Result<()> {
        self.lincomb(0.0, &[(1.0, src)])
    }
    /// `self *= c`.
    fn scale(&mut self, c: f64) -> Result<()> {
        self.lincomb(c, &[])
    }
}

/// Element type of a host buffer.
pub trait HostScalar: Copy + Default + Send + Sync + From<f32> + 'static {
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    fn mul_add_(a: Self, c: Self, x: Self) -> Self;
    fn mul(a: Self, b: Self) -> Self;
}
impl HostScalar for f32 {
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn mul_add_(a: Self, c: Self, x: Self) -> Self {
        a + c * x
    }
    #[inline(always)]
    fn mul(a: Self, b: Self) -> Self {
        a * b
    }
}
impl HostScalar for f64 {
    fn from_f64(v: f64) -> Self {
        v
    }
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn mul_add_(a: Self, c: Self, x: Self) -> Self {
        a + c * x
    }
    #[inline(always)]
    fn mul(a: Self, b: Self) -> Self {
        a * b
    }
}

/// Host-side lincomb: one pass over memory; the common small arities are unrolled so the compiler vectorises
/// them (this is the per-step overhead the benchmark measures).
fn host_lincomb<T: HostScalar>(out: &mut [T], beta: f64, terms: &[(f64, &[T])]) {
    let b = T::from_f64(beta);
    let c: Vec<T> = terms.iter().map(|t| T::from_f64(t.0)).collect();
    let x: Vec<&[T]> = terms.iter().map(|t| &t.1[..out.len()]).collect();
    let zero_beta = beta == 0.0;
    match (zero_beta, x.len()) {
        (true, 0) => out.iter_mut().for_each(|o| *o = T::default()),
        (false, 0) => out.iter_mut().for_each(|o| *o = T::mul(b, *o)),
        (true, 1) => {
            for (o, &a) in out.iter_mut().zip(x[0]) {
                *o = T::mul(c[0], a);
            }
        }
        (false, 1) => {
            for (o, &a) in out.iter_mut().zip(x[0]) {
                *o = T::mul_add_(T::mul(b, *o), c[0], a);
            }
        }
        (true, 2) => {
            for ((o, &a0), &a1) in out.iter_mut().zip(x[0]).zip(x[1]) {
                *o = T::mul_add_(T::mul(c[0], a0), c[1], a1);
            }
        }
        (false, 2) => {
            for ((o, &a0), &a1) in out.iter_mut().zip(x[0]).zip(x[1]) {
                *o = T::mul_add_(T::mul_add_(T::mul(b, *o), c[0], a0), c[1], a1);
            }
        }
        (true, 3) => {
            for (((o, &a0), &a1), &a2) in out.iter_mut().zip(x[0]).zip(x[1]).zip(x[2]) {
                *o = T::mul_add_(T::mul_add_(T::mul(c[0], a0), c[1], a1), c[2], a2);
            }
        }
        (false, 3) => {
            for (((o, &a0), &a1), &a2) in out.iter_mut().zip(x[0]).zip(x[1]).zip(x[2]) {
                *o = T::mul_add_(
                    T::mul_add_(T::mul_add_(T::mul(b, *o), c[0], a0), c[1], a1),
                    c[2],
                    a2,
                );
            }
        }
        _ => {
            // General arity: blocked so each block of `out` stays in cache while the inputs stream past.
            const BLK: usize = 4096;
            let n = out.len();
            let mut s = 0;
            while s < n {
                let e = (s + BLK).min(n);
                let o = &mut out[s..e];
                if zero_beta {
                    for (v, &a) in o.iter_mut().zip(&x[0][s..e]) {
                        *v = T::mul(c[0], a);
                    }
                } else {
                    for (v, &a) in o.iter_mut().zip(&x[0][s..e]) {
                        *v = T::mul_add_(T::mul(b, *v), c[0], a);
                    }
                }
                for k in 1..x.len() {
                    let ck = c[k];
                    for (v, &a) in o.iter_mut().zip(&x[k][s..e]) {
                        *v = T::mul_add_(*v, ck, a);
                    }
                }
                s = e;
            }
        }
    }
}

/// Splits large buffers over threads (memory bound: a few threads saturate bandwidth).
fn par_lincomb<T: HostScalar>(out: &mut [T], beta: f64, terms: &[(f64, &[T])]) {
    let n = out.len();
    let threads = if n >= 1 << 17 {
        std::thread::available_parallelism().map_or(1, |p| p.get().min(8))
    } else {
        1
    };
    if threads <= 1 {
        return host_lincomb(out, beta, terms);
    }
    let chunk = n.div_ceil(threads);
    std::thread::scope(|sc| {
        for (k, part) in out.chunks_mut(chunk).enumerate() {
            let s = k * chunk;
            let e = s + part.len();
            let sub: Vec<(f64, &[T])> = terms.iter().map(|(c, x)| (*c, &x[s..e])).collect();
            sc.spawn(move || host_lincomb(part, beta, &sub));
        }
    });
}

macro_rules! host_buffer {
    ($t:ty) => {
        impl Buffer for Vec<$t> {
            fn len(&self) -> usize {
                <[$t]>::len(self)
            }
            fn alloc_like(&self) -> Result<Self> {
                Ok(vec![0.0; <[$t]>::len(self)])
            }
            fn lincomb_raw(&mut self, beta: f64, terms: &[(f64, &Self)]) -> Result<()> {
                if terms.len() > MAX_TERMS {
                    bail!("lincomb_raw: {} terms, at most {MAX_TERMS}", terms.len());
                }
                let t: Vec<(f64, &[$t])> = terms.iter().map(|(c, x)| (*c, x.as_slice())).collect();
                par_lincomb(self.as_mut_slice(), beta, &t);
                Ok(())
            }
            fn fill_normal(&mut self, seed: u64, stream: u64) -> Result<()> {
                super::gauss::fill_normal_host(self.as_mut_slice(), seed, stream);
                Ok(())
            }
            fn to_host_f64(&self) -> Result<Vec<f64>> {
                Ok(self.iter().map(|&v| v as f64).collect())
            }
            fn set_from_f64(&mut self, v: &[f64]) -> Result<()> {
                if v.len() != <[$t]>::len(self) {
                    bail!(
                        "set_from_f64: {} values for {} elements",
                        v.len(),
                        <[$t]>::len(self)
                    );
                }
                for (o, &s) in self.iter_mut().zip(v) {
                    *o = s as $t;
                }
                Ok(())
            }
        }
    };
}
host_buffer!(f32);
host_buffer!(f64);

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn lincomb_all_arities_match_naive() {
        let n = 10_001;
        let xs: Vec<Vec<f64>> = (0..11)
            .map(|k| {
                (0..n)
                    .map(|i| ((i * 7 + k * 13) % 97) as f64 - 48.0)
                    .collect()
            })
            .collect();
        for m in 0..=11 {
            for beta in [0.0, 0.75] {
                let mut out: Vec<f64> = (0..n).map(|i| (i % 5) as f64).collect();
                let expect: Vec<f64> = (0..n)
                    .map(|i| {
                        let mut s = beta * out[i];
                        for (k, xk) in xs.iter().take(m).enumerate() {
                            s += (k as f64 * 0.5 - 1.0) * xk[i];
                        }
                        s
                    })
                    .collect();
                let terms: Vec<(f64, &Vec<f64>)> =
                    (0..m).map(|k| (k as f64 * 0.5 - 1.0, &xs[k])).collect();
                out.lincomb(beta, &terms).unwrap();
                for i in 0..n {
                    assert!((out[i] - expect[i]).abs() < 1e-9, "m={m} beta={beta} i={i}");
                }
            }
        }
    }
    #[test]
    fn threaded_lincomb_matches_serial() {
        let n = 300_007;
        let a: Vec<f32> = (0..n).map(|i| (i % 13) as f32).collect();
        let b: Vec<f32> = (0..n).map(|i| (i % 7) as f32 - 3.0).collect();
        let mut o1: Vec<f32> = (0..n).map(|i| (i % 3) as f32).collect();
        let mut o2 = o1.clone();
        o1.lincomb(0.5, &[(1.5, &a), (-2.0, &b)]).unwrap();
        host_lincomb(&mut o2, 0.5, &[(1.5, &a[..]), (-2.0, &b[..])]);
        assert_eq!(o1, o2);
    }

    #[test]
    fn beta_zero_ignores_nan_output() {
        let mut out = vec![f32::NAN; 5];
        let x = vec![1.0f32; 5];
        out.lincomb(0.0, &[(2.0, &x)]).unwrap();
        assert_eq!(out, vec![2.0; 5]);
    }
    #[test]
    fn length_mismatch_is_an_error() {
        let mut out = vec![0.0f32; 5];
        let x = vec![1.0f32; 4];
        assert!(out.lincomb(1.0, &[(2.0, &x)]).is_err());
    }
}
