//! phi functions of exponential integrators, `phi_0(z) = e^z`, `phi_j(z) = (phi_{j-1}(z) - 1/(j-1)!) / z`,
//! accurate in f64 for any z <= 0 including tiny |z| (where the recurrence cancels catastrophically).
//!
//! For |z| < 5 the Taylor series `phi_j(z) = sum_k z^k / (k + j)!` (terms shrink fast, and for z < 0 the
//! alternation loses at most ~2 digits at |z| = 5); beyond, the recurrence, which is stable once each step
//! divides by |z| >= 5.
pub fn phi(j: usize, z: f64) -> f64 {
    if j == 0 {
        return z.exp();
    }
    if z.abs() < 5.0 {
        // sum_k z^k / (k+j)!, starting from 1/j!
        let mut term = 1.0 / factorial(j);
        let mut sum = term;
        for k in 1..200 {
            term *= z / (k + j) as f64;
            sum += term;
            if term.abs() < 1e-18 * sum.abs() {
                break;
            }
        }
        return sum;
    }
    let mut p = z.exp();
    for k in 1..=j {
        p = (p - 1.0 / factorial(k - 1)) / z;
    }
    p
}

pub fn factorial(n: usize) -> f64 {
    (1..=n).fold(1.0, |a, k| a * k as f64)
}

/// RES4LYF's `Phi(h, c)` accessor: `get(j, None)` is `phi_j(-h)`, `get(j, Some(i))` is `phi_j(-h c_i)` for
/// the 1-based stage i (0 when c_i = 0, as RES4LYF does, except j = 0).
pub struct PhiAt<'a> {
    pub h: f64,
    pub c: &'a [f64],
}
impl PhiAt<'_> {
    pub fn get(&self, j: usize, stage: Option<usize>) -> f64 {
        let c = match stage {
            None => 1.0,
            Some(i) => self.c[i - 1],
        };
        if c == 0.0 && j > 0 {
            return 0.0;
        }
        phi(j, -self.h * c)
    }
    /// `phi_j(-h)`.
    pub fn f(&self, j: usize) -> f64 {
        self.get(j, None)
    }
    /// `phi_j(-h c_i)`, i 1-based.
    pub fn s(&self, j: usize, i: usize) -> f64 {
        self.get(j, Some(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    /// Independent reference: `phi_j(z) = 1/(j-1)! int_0^1 e^{(1-t) z} t^{j-1} dt` by composite Simpson with
    /// many panels (smooth integrand, so ~1e-15).
    fn phi_integral(j: usize, z: f64) -> f64 {
        let n = 20_000;
        let f = |t: f64| ((1.0 - t) * z).exp() * t.powi(j as i32 - 1);
        let h = 1.0 / n as f64;
        let mut s = f(0.0) + f(1.0);
        for k in 1..n {
            s += if k % 2 == 1 { 4.0 } else { 2.0 } * f(k as f64 * h);
        }
        s * h / 3.0 / factorial(j - 1)
    }
    #[test]
    fn phi_matches_integral_form_across_scales() {
        for j in 1..=6 {
            for z in [
                -1e-12, -1e-6, -0.01, -0.5, -2.0, -4.99, -5.0, -7.5, -20.0, -60.0,
            ] {
                let (a, b) = (phi(j, z), phi_integral(j, z));
                assert!(
                    ((a - b) / b).abs() < 1e-12,
                    "phi_{j}({z}) = {a}, reference {b}"
                );
            }
        }
    }
    #[test]
    fn phi_recurrence_holds() {
        for j in 1..=6 {
            for z in [-0.3, -3.0, -6.0, -11.0] {
                let lhs = phi(j - 1, z);
                let rhs = z * phi(j, z) + 1.0 / factorial(j - 1);
                assert!(
                    (lhs - rhs).abs() < 1e-14 * lhs.abs().max(1.0),
                    "j={j} z={z}"
                );
            }
        }
    }
}
