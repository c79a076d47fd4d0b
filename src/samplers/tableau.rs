//! Butcher tableaux as static data, and the order conditions that prove them.

/// A Runge-Kutta method `(a, b, c)` with the order it claims.
#[derive(Debug)]
pub struct Tableau {
    pub name: &'static str,
    pub order: usize,
    pub a: &'static [&'static [f64]],
    pub b: &'static [f64],
    pub c: &'static [f64],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Explicit,
    DiagonallyImplicit,
    FullyImplicit,
}

impl Tableau {
    pub fn stages(&self) -> usize {
        self.b.len()
    }
    pub fn kind(&self) -> Kind {
        let s = self.stages();
        let mut kind = Kind::Explicit;
        for i in 0..s {
            for j in i..s {
                if self.a[i][j] != 0.0 {
                    if j > i {
                        return Kind::FullyImplicit;
                    }
                    kind = Kind::DiagonallyImplicit;
                }
            }
        }
        kind
    }
}

/// Rooted trees up to a given order, each as the list of its children's indices (non-decreasing), in order
/// of increasing size: the index set of the classical order conditions.
pub struct Trees {
    pub order: Vec<usize>,
    pub children: Vec<Vec<usize>>,
}

impl Trees {
    pub fn up_to(max_order: usize) -> Self {
        let mut t = Trees {
            order: vec![],
            children: vec![],
        };
        for n in 1..=max_order {
            // Children multisets with total order n - 1, as non-decreasing index lists.
            let mut found = vec![];
            let mut cur = vec![];
            t.partitions(n - 1, 0, &mut cur, &mut found);
            for ch in found {
                t.order.push(n);
                t.children.push(ch);
            }
        }
        t
    }
    fn partitions(
        &self,
        rem: usize,
        min_id: usize,
        cur: &mut Vec<usize>,
        out: &mut Vec<Vec<usize>>,
    ) {
        if rem == 0 {
            out.push(cur.clone());
            return;
        }
        for id in min_id..self.order.len() {
            if self.order[id] <= rem {
                cur.push(id);
                self.partitions(rem - self.order[id], id, cur, out);
                cur.pop();
            }
        }
    }
    /// Density gamma(t).
    pub fn gamma(&self, t: usize) -> f64 {
        self.order[t] as f64
            * self.children[t]
                .iter()
                .map(|&c| self.gamma(c))
                .product::<f64>()
    }
}

/// Largest |b . Phi(t) - 1/gamma(t)| over trees of each order 1..=max_order (index 0 is order 1). Uses A's
/// rows as they are (not assuming c = A 1), so it also catches an inconsistent c.
pub fn order_residuals(tab: &Tableau, max_order: usize) -> Vec<f64> {
    let trees = Trees::up_to(max_order);
    let s = tab.stages();
    let mut g: Vec<Vec<f64>> = Vec::with_capacity(trees.order.len());
    let mut res = vec![0.0f64; max_order];
    for t in 0..trees.order.len() {
        let mut v = vec![1.0; s];
        for &ch in &trees.children[t] {
            for (i, vi) in v.iter_mut().enumerate() {
                *vi *= (0..s).map(|j| tab.a[i][j] * g[ch][j]).sum::<f64>();
            }
        }
        let phi: f64 = (0..s).map(|i| tab.b[i] * v[i]).sum();
        let r = (phi - 1.0 / trees.gamma(t)).abs();
        let o = trees.order[t] - 1;
        res[o] = res[o].max(r);
        g.push(v);
    }
    res
}

/// Largest order p such that all tree conditions up to p hold within `tol` (checked up to `max_order`).
pub fn tree_order(tab: &Tableau, max_order: usize, tol: f64) -> usize {
    order_residuals(tab, max_order)
        .iter()
        .take_while(|&&r| r <= tol)
        .count()
}

/// Butcher's simplifying assumptions: the largest p, q, r with B(p), C(q), D(r) within `tol` (each capped at
/// `cap`). By Butcher's theorem the method has order >= min(p, q + r + 1, 2q + 2).
pub fn simplifying(tab: &Tableau, cap: usize, tol: f64) -> (usize, usize, usize) {
    let s = tab.stages();
    let (a, b, c) = (tab.a, tab.b, tab.c);
    let bk = |k: usize| {
        ((0..s).map(|i| b[i] * c[i].powi(k as i32 - 1)).sum::<f64>() - 1.0 / k as f64).abs() <= tol
    };
    let ck = |k: usize| {
        (0..s).all(|i| {
            ((0..s)
                .map(|j| a[i][j] * c[j].powi(k as i32 - 1))
                .sum::<f64>()
                - c[i].powi(k as i32) / k as f64)
                .abs()
                <= tol
        })
    };
    let dk = |k: usize| {
        (0..s).all(|j| {
            ((0..s)
                .map(|i| b[i] * c[i].powi(k as i32 - 1) * a[i][j])
                .sum::<f64>()
                - b[j] * (1.0 - c[j].powi(k as i32)) / k as f64)
                .abs()
                <= tol
        })
    };
    let p = (1..=cap).take_while(|&k| bk(k)).count();
    let q = (1..=cap).take_while(|&k| ck(k)).count();
    let r = (1..=cap).take_while(|&k| dk(k)).count();
    (p, q, r)
}

/// Highest order whose rooted-tree conditions are checked one by one (719 trees); beyond it only Butcher's
/// simplifying assumptions prove an order.
pub const TREE_ORDER_MAX: usize = 9;

/// The order this tableau provably has: tree conditions up to order [`TREE_ORDER_MAX`], and beyond that the
/// simplifying assumptions (whose bound is exact for the collocation families, Gauss/Radau/Lobatto).
pub fn proven_order(tab: &Tableau, tol: f64) -> usize {
    let trees = tree_order(tab, TREE_ORDER_MAX, tol);
    let (p, q, r) = simplifying(tab, 24, tol);
    let simp = p.min(q + r + 1).min(2 * q + 2);
    if trees == TREE_ORDER_MAX {
        trees.max(simp)
    } else {
        trees
    }
}
