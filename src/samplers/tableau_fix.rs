//! Corrected versions of the RES4LYF tableaux whose published coefficients fail the order conditions of
//! their order. Each is registered under RES4LYF's name; what was wrong in the published one, and why the
//! correction is the method RES4LYF meant, is in [`FIXES`] (and README "Samplers").
//!
//! The collocation families are computed in f64 from their definition (nodes = roots of shifted Legendre /
//! Radau polynomials, `a_ij = int_0^{c_i} l_j`, `b_j = int_0^1 l_j` with the Lagrange basis l_j, integrated
//! exactly by Gauss quadrature), the others are the literature's exact values.
use super::tableau::Tableau;

/// A tableau's (a, b, c) as owned rows.
type Abc = (Vec<Vec<f64>>, Vec<f64>, Vec<f64>);

/// How a corrected tableau is built.
pub enum Build {
    /// Gauss-Legendre collocation with s stages, in the given node order (indices into the ascending nodes).
    Gauss(&'static [usize]),
    /// Radau IIA collocation (right Radau nodes, c_s = 1) with s stages.
    RadauIIA(usize),
    /// Exact coefficients: a (full rows), b, c.
    Exact(fn() -> Abc),
}

pub struct Fix {
    pub name: &'static str,
    /// The order the corrected method has (proven by the order conditions in tests/samplers_tableaux.rs).
    pub order: usize,
    pub build: Build,
    /// What was wrong in the published coefficients.
    pub why: &'static str,
}

pub static FIXES: &[Fix] = &[
    Fix {
        name: "gauss-legendre_diag_8s",
        order: 16,
        build: Build::Gauss(&[0, 1, 2, 3, 4, 5, 6, 7]),
        why: "RES4LYF's a is IRKGaussLegendre.jl's mu = a_ij / b_j (lower triangle, diagonal 1/2) with the upper \
              triangle (mu_ji = 1 - mu_ij) dropped; b and c are the 8-stage Gauss ones",
    },
    Fix {
        name: "gauss-legendre_5s",
        order: 10,
        build: Build::Gauss(&[2, 1, 3, 0, 4]),
        why: "surd approximations (sqrt 739) of the Gauss nodes/weights, good to ~2e-4, and a[4][1], a[4][2] \
              swapped",
    },
    Fix {
        name: "gauss-legendre_5s_ascending",
        order: 10,
        build: Build::Gauss(&[0, 1, 2, 3, 4]),
        why: "gauss-legendre_5s's rows re-ordered by c believed ascending (its comments take 1/2 - 99 sqrt(739) \
              / 10000 for the smallest node: stages 1/2 and 4/5 are swapped) but the columns not re-ordered",
    },
    Fix {
        name: "gauss-legendre_4s_alt",
        order: 8,
        build: Build::Gauss(&[0, 1, 2, 3]),
        why: "the paper's approximations of the 4-point Gauss method (c = 0.33, 0.67, ...), good to ~3e-5, and \
              three typos: a[1][0] and a[1][3] swapped, a[1][1] = 347013/21284000 (one 0 too many), a[2][3] sign",
    },
    Fix {
        name: "gauss-legendre_4s",
        order: 8,
        build: Build::Gauss(&[0, 1, 2, 3]),
        why: "not a 4-stage Gauss method: only two distinct nodes (the 3-stage 1/2 -+ sqrt(15)/10) and \
              1/4 -+ sqrt(15)/6 entries; replaced by the 4-stage Gauss-Legendre method, nodes ascending",
    },
    Fix {
        name: "gauss-legendre_4s_alternating_a",
        order: 8,
        build: Build::Gauss(&[0, 2, 1, 3]),
        why: "as gauss-legendre_4s; stages ordered low/high/low/high as its c alternates",
    },
    Fix {
        name: "gauss-legendre_4s_ascending_a",
        order: 8,
        build: Build::Gauss(&[0, 1, 2, 3]),
        why: "as gauss-legendre_4s; nodes ascending as its name and c say",
    },
    Fix {
        name: "radau_iia_4s",
        order: 7,
        build: Build::RadauIIA(4),
        why: "a is empty, b = 1/4 each and c = (4 -+ sqrt 6)/11, 1/2, 1 are no Radau method (only c_4 = 1 is \
              right)",
    },
    Fix {
        name: "radau_ia_3s",
        order: 5,
        build: Build::Exact(radau_ia_3s),
        why: "a[2][1] and a[2][2] are 11/45 -+ ... where Hairer-Wanner's Radau IA has (88 + 43 sqrt 6)/360 and \
              (88 - 7 sqrt 6)/360: the signs of their sqrt 6 terms are swapped",
    },
    Fix {
        name: "kraaijevanger_spijker_2s",
        order: 1,
        build: Build::Exact(kraaijevanger_spijker_2s),
        why: "the published coefficients are the literature's, but they are first order (b.c = 2, not 1/2); \
              registered unchanged with order 1",
    },
    Fix {
        name: "verner_13s",
        order: 9,
        build: Build::Exact(verner9),
        why: "only c published (Verner's 9(8) c_2..c_14, 'some values are missing'); a and b completed from \
              Verner's most efficient 9(8) pair (the 15 stages its 9th-order solution uses)",
    },
    Fix {
        name: "rk5_7s",
        order: 4,
        build: Build::Exact(rk5_7s),
        why: "Dormand-Prince 5(4) with two sign typos (a[4][3] = +212/729, 'flipped' on purpose, and a[5][0] = \
              -9017/3168); its b is DP's embedded 4th-order row, so the corrected method is order 4",
    },
];

/// Corrected tableau for a RES4LYF name, if it has one.
pub fn corrected(name: &str) -> Option<&'static Tableau> {
    all().iter().find(|t| t.name == name)
}

/// All corrected tableaux, built once.
pub fn all() -> &'static [Tableau] {
    static T: std::sync::OnceLock<Vec<Tableau>> = std::sync::OnceLock::new();
    T.get_or_init(|| FIXES.iter().map(build).collect())
}

fn leak(v: Vec<f64>) -> &'static [f64] {
    Box::leak(v.into_boxed_slice())
}

fn build(f: &Fix) -> Tableau {
    let (a, b, c) = match &f.build {
        Build::Gauss(perm) => {
            let (x, _) = gauss_legendre01(perm.len());
            let c: Vec<f64> = perm.iter().map(|&i| x[i]).collect();
            let (a, b) = collocation(&c);
            (a, b, c)
        }
        Build::RadauIIA(s) => {
            let c = radau_iia_nodes(*s);
            let (a, b) = collocation(&c);
            (a, b, c)
        }
        Build::Exact(f) => f(),
    };
    let a: Vec<&'static [f64]> = a.into_iter().map(leak).collect();
    Tableau {
        name: f.name,
        order: f.order,
        a: Box::leak(a.into_boxed_slice()),
        b: leak(b),
        c: leak(c),
    }
}

/// Legendre polynomial P_n(t) by its three-term recurrence.
fn legendre(n: usize, t: f64) -> f64 {
    let (mut p0, mut p1) = (1.0, t);
    if n == 0 {
        return p0;
    }
    for k in 1..n {
        let p2 = ((2 * k + 1) as f64 * t * p1 - k as f64 * p0) / (k + 1) as f64;
        (p0, p1) = (p1, p2);
    }
    p1
}

/// The simple roots of `f` in (0, 1), ascending: sign changes on a fine grid, then bisection to the last bit
/// (robust, and exact to rounding of `f` near the root).
fn roots01(f: impl Fn(f64) -> f64, n: usize) -> Vec<f64> {
    let m = 4096;
    let mut out = Vec::with_capacity(n);
    for k in 0..m {
        let (mut lo, mut hi) = (k as f64 / m as f64, (k + 1) as f64 / m as f64);
        let (flo, fhi) = (f(lo), f(hi));
        if flo == 0.0 && k > 0 {
            out.push(lo);
            continue;
        }
        if flo * fhi >= 0.0 {
            continue;
        }
        let sl = flo.signum();
        for _ in 0..200 {
            let mid = 0.5 * (lo + hi);
            if mid <= lo || mid >= hi {
                break;
            }
            if f(mid).signum() == sl {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        out.push(0.5 * (lo + hi));
    }
    assert_eq!(
        out.len(),
        n,
        "root count of a degree-{n} orthogonal polynomial"
    );
    out
}

/// Gauss-Legendre nodes and weights on [0, 1]: roots of P_s(2x - 1), weights `1 / ((1 - t^2) P_s'(t)^2)` (on
/// [-1, 1], halved), with `P_s'(t) = s (t P_s - P_{s-1}) / (t^2 - 1)`.
pub fn gauss_legendre01(s: usize) -> (Vec<f64>, Vec<f64>) {
    let x = roots01(|x| legendre(s, 2.0 * x - 1.0), s);
    let w = x
        .iter()
        .map(|&x| {
            let t = 2.0 * x - 1.0;
            let dp = s as f64 * (t * legendre(s, t) - legendre(s - 1, t)) / (t * t - 1.0);
            1.0 / ((1.0 - t * t) * dp * dp)
        })
        .collect();
    (x, w)
}

/// Radau IIA nodes: the roots of P_s(2x - 1) - P_{s-1}(2x - 1) (s - 1 inside (0, 1), and 1).
pub fn radau_iia_nodes(s: usize) -> Vec<f64> {
    let mut c = roots01(
        |x| legendre(s, 2.0 * x - 1.0) - legendre(s - 1, 2.0 * x - 1.0),
        s - 1,
    );
    c.push(1.0);
    c
}

/// Collocation method on nodes c: `a_ij = int_0^{c_i} l_j`, `b_j = int_0^1 l_j`, each integral by s-point
/// Gauss quadrature (exact: l_j has degree s - 1).
pub fn collocation(c: &[f64]) -> (Vec<Vec<f64>>, Vec<f64>) {
    let s = c.len();
    let (gx, gw) = gauss_legendre01(s);
    let l = |j: usize, t: f64| -> f64 {
        (0..s)
            .filter(|&m| m != j)
            .map(|m| (t - c[m]) / (c[j] - c[m]))
            .product()
    };
    let int = |j: usize, up: f64| -> f64 {
        gx.iter()
            .zip(&gw)
            .map(|(&x, &w)| up * w * l(j, up * x))
            .sum()
    };
    let a = c
        .iter()
        .map(|&ci| (0..s).map(|j| int(j, ci)).collect())
        .collect();
    let b = (0..s).map(|j| int(j, 1.0)).collect();
    (a, b)
}

/// Radau IA, 3 stages (Hairer-Wanner II, Table IV.5.3).
fn radau_ia_3s() -> Abc {
    let r6 = 6f64.sqrt();
    let a = vec![
        vec![1.0 / 9.0, (-1.0 - r6) / 18.0, (-1.0 + r6) / 18.0],
        vec![
            1.0 / 9.0,
            (88.0 + 7.0 * r6) / 360.0,
            (88.0 - 43.0 * r6) / 360.0,
        ],
        vec![
            1.0 / 9.0,
            (88.0 + 43.0 * r6) / 360.0,
            (88.0 - 7.0 * r6) / 360.0,
        ],
    ];
    let b = vec![1.0 / 9.0, (16.0 + r6) / 36.0, (16.0 - r6) / 36.0];
    let c = vec![0.0, (6.0 - r6) / 10.0, (6.0 + r6) / 10.0];
    (a, b, c)
}

fn kraaijevanger_spijker_2s() -> Abc {
    (
        vec![vec![0.5, 0.0], vec![-0.5, 2.0]],
        vec![-0.5, 1.5],
        vec![0.5, 1.5],
    )
}

/// Dormand-Prince 5(4) stages with the 4th-order weights (RES4LYF's b row).
fn rk5_7s() -> Abc {
    let a = vec![
        vec![0.0; 7],
        vec![1.0 / 5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        vec![3.0 / 40.0, 9.0 / 40.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        vec![44.0 / 45.0, -56.0 / 15.0, 32.0 / 9.0, 0.0, 0.0, 0.0, 0.0],
        vec![
            19372.0 / 6561.0,
            -25360.0 / 2187.0,
            64448.0 / 6561.0,
            -212.0 / 729.0,
            0.0,
            0.0,
            0.0,
        ],
        vec![
            9017.0 / 3168.0,
            -355.0 / 33.0,
            46732.0 / 5247.0,
            49.0 / 176.0,
            -5103.0 / 18656.0,
            0.0,
            0.0,
        ],
        vec![
            35.0 / 384.0,
            0.0,
            500.0 / 1113.0,
            125.0 / 192.0,
            -2187.0 / 6784.0,
            11.0 / 84.0,
            0.0,
        ],
    ];
    let b = vec![
        5179.0 / 57600.0,
        0.0,
        7571.0 / 16695.0,
        393.0 / 640.0,
        -92097.0 / 339200.0,
        187.0 / 2100.0,
        1.0 / 40.0,
    ];
    let c = vec![0.0, 0.2, 0.3, 0.8, 8.0 / 9.0, 1.0, 1.0];
    (a, b, c)
}

/// Verner's "most efficient" 9(8) pair, the 15 stages of its 9th-order solution (the 16th only feeds the
/// error estimate), coefficients as Verner publishes them, rounded to f64.
fn verner9() -> Abc {
    const A: &[&[f64]] = &[
        &[],
        &[0.03462],
        &[-0.03893354388572875, 0.13595789452450918],
        &[0.03638413148954267, 0.0, 0.10915239446862801],
        &[
            2.0257639143939694,
            0.0,
            -7.638023836496291,
            6.173259922102322,
        ],
        &[
            0.05112275589406061,
            0.0,
            0.0,
            0.17708237945550218,
            0.0008027762409222536,
        ],
        &[
            0.13160063579752163,
            0.0,
            0.0,
            -0.2957276252669636,
            0.08781378035642955,
            0.6213052975225274,
        ],
        &[
            0.07166666666666667,
            0.0,
            0.0,
            0.0,
            0.0,
            0.33055335789153195,
            0.2427799754418014,
        ],
        &[
            0.071806640625,
            0.0,
            0.0,
            0.0,
            0.0,
            0.3294380283228177,
            0.1165190029271823,
            -0.034013671875,
        ],
        &[
            0.04836757646340646,
            0.0,
            0.0,
            0.0,
            0.0,
            0.03928989925676164,
            0.10547409458903446,
            -0.021438652846483126,
            -0.10412291746271944,
        ],
        &[
            -0.026645614872014785,
            0.0,
            0.0,
            0.0,
            0.0,
            0.03333333333333333,
            -0.1631072244872467,
            0.03396081684127761,
            0.1572319413814626,
            0.21522674780318796,
        ],
        &[
            0.03689009248708622,
            0.0,
            0.0,
            0.0,
            0.0,
            -0.1465181576725543,
            0.2242577768172024,
            0.02294405717066073,
            -0.0035850052905728597,
            0.08669223316444385,
            0.43838406519683376,
        ],
        &[
            -0.4866012215113341,
            0.0,
            0.0,
            0.0,
            0.0,
            -6.304602650282853,
            -0.2812456182894729,
            -2.679019236219849,
            0.5188156639241577,
            1.3653531876033418,
            5.8850910885039465,
            2.8028087862720628,
        ],
        &[
            0.4185367457753472,
            0.0,
            0.0,
            0.0,
            0.0,
            6.724547581906459,
            -0.42544428016461133,
            3.3432791530012653,
            0.6170816631175374,
            -0.9299661239399329,
            -6.099948804751011,
            -3.002206187889399,
            0.2553202529443446,
        ],
        &[
            -0.7793740861228848,
            0.0,
            0.0,
            0.0,
            0.0,
            -13.937342538107776,
            1.2520488533793563,
            -14.691500408016868,
            -0.494705058533141,
            2.2429749091462368,
            13.367893803828643,
            14.396650486650687,
            -0.79758133317768,
            0.4409353709534278,
        ],
    ];
    const B: &[f64] = &[
        0.014611976858423152,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        -0.3915211862331339,
        0.23109325002895065,
        0.12747667699928525,
        0.2246434176204158,
        0.5684352689748513,
        0.058258715572158275,
        0.13643174034822156,
        0.030570139830827976,
    ];
    const C: &[f64] = &[
        0.0,
        0.03462,
        0.09702435063878045,
        0.14553652595817068,
        0.561,
        0.22900791159048503,
        0.544992088409515,
        0.645,
        0.48375,
        0.06757,
        0.25,
        0.6590650618730999,
        0.8206,
        0.9012,
        1.0,
    ];
    let s = B.len();
    let a = A
        .iter()
        .map(|r| {
            let mut row = r.to_vec();
            row.resize(s, 0.0);
            row
        })
        .collect();
    (a, B.to_vec(), C.to_vec())
}
