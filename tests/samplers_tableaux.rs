//! Tableaux: RES4LYF's numbers transcribed exactly (golden file from scripts/golden/samplers_res4lyf.py), and
//! every registered tableau meets the order conditions of its claimed order to 1e-12.
mod common;
use common::samplers::{golden, vecf};
use trt_diff::samplers::registry;
use trt_diff::samplers::tableau::{
    Kind, TABLEAUX, Trees, order_residuals, proven_order, simplifying, tree_order,
};

/// Equal to the last couple of ulps (serde_json's default float parsing is not always correctly rounded).
fn same(a: &[f64], b: &[f64], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (x, y) in a.iter().zip(b) {
        assert!(
            (x - y).abs() <= 4.0 * f64::EPSILON * x.abs().max(y.abs()),
            "{what}: {x} vs {y}"
        );
    }
}

#[test]
fn transcription_matches_res4lyf_exactly() {
    let g = golden("res4lyf.json");
    let t = g["tableaux"].as_object().unwrap();
    assert_eq!(t.len(), TABLEAUX.len());
    for tab in TABLEAUX {
        let r = &t[tab.name];
        same(&vecf(&r["b"]), tab.b, &format!("{} b", tab.name));
        same(&vecf(&r["c"]), tab.c, &format!("{} c", tab.name));
        let a = r["a"].as_array().unwrap();
        assert_eq!(a.len(), tab.a.len());
        for (i, row) in a.iter().enumerate() {
            same(&vecf(row), tab.a[i], &format!("{} a[{i}]", tab.name));
        }
    }
}

#[test]
fn rooted_tree_counts() {
    // OEIS A000081: 1, 1, 2, 4, 9, 20, 48, 115 rooted trees of order 1..8.
    let t = Trees::up_to(8);
    let counts: Vec<usize> = (1..=8)
        .map(|n| t.order.iter().filter(|&&o| o == n).count())
        .collect();
    assert_eq!(counts, vec![1, 1, 2, 4, 9, 20, 48, 115]);
    // gamma of the tall tree of order 4 is 4*3*2*1, of the bushy one 4.
    let g: Vec<f64> = (0..t.order.len())
        .filter(|&i| t.order[i] == 4)
        .map(|i| t.gamma(i))
        .collect();
    assert!(g.contains(&24.0) && g.contains(&4.0));
}

#[test]
fn classical_methods_have_exact_orders() {
    // Known exact orders (not just lower bounds): the check must also see where they stop.
    for (name, order) in [
        ("rk4_4s", 4),
        ("heun_2s", 2),
        ("kutta_3s", 3),
        ("dormand-prince_6s", 5),
        ("gauss-legendre_2s", 4),
        ("radau_iia_2s", 3),
    ] {
        let t = TABLEAUX.iter().find(|t| t.name == name).unwrap();
        assert_eq!(tree_order(t, 8, 1e-12), order, "{name}");
    }
}

#[test]
fn registered_tableaux_meet_their_order_conditions() {
    let reg = registry::tableaux();
    assert!(reg.len() >= 45, "{} registered", reg.len());
    for t in reg {
        // Tree conditions up to min(order, 8) to 1e-12 ...
        let res = order_residuals(t, t.order.min(8));
        for (k, r) in res.iter().enumerate() {
            assert!(*r <= 1e-12, "{} order {} residual {r:e}", t.name, k + 1);
        }
        // ... and beyond 8 Butcher's simplifying assumptions B(p), C(q), D(r).
        if t.order > 8 {
            let (p, q, r) = simplifying(t, 24, 1e-12);
            assert!(p.min(q + r + 1).min(2 * q + 2) >= t.order, "{}", t.name);
        }
        // Explicit methods: c is consistent with A (row sums). Some implicit families do not have C(1) by
        // construction (Lobatto IIIB, IIID); their convergence on the non-autonomous ODE is checked in
        // samplers_convergence.
        if t.kind() != Kind::Explicit {
            continue;
        }
        for (i, row) in t.a.iter().enumerate() {
            let s: f64 = row.iter().sum();
            assert!(
                (s - t.c[i]).abs() < 1e-12,
                "{} row {i}: sum {s} c {}",
                t.name,
                t.c[i]
            );
        }
    }
}

/// RES4LYF tableaux whose published coefficients fail the order conditions are not registered. This list
/// pins which (if RES4LYF fixes one, the golden changes and this test says so).
#[test]
fn defective_res4lyf_tableaux_are_excluded() {
    let mut ex = registry::excluded_tableaux();
    ex.sort();
    let mut want = vec![
        "gauss-legendre_diag_8s",
        "gauss-legendre_5s",
        "gauss-legendre_5s_ascending",
        "gauss-legendre_4s_alt",
        "gauss-legendre_4s",
        "gauss-legendre_4s_alternating_a",
        "gauss-legendre_4s_ascending_a",
        "radau_iia_4s",
        "radau_ia_3s",
        "kraaijevanger_spijker_2s",
        "verner_13s",
        "rk5_7s",
    ];
    want.sort();
    assert_eq!(ex, want);
    for name in want {
        let t = TABLEAUX.iter().find(|t| t.name == name).unwrap();
        assert!(proven_order(t, 1e-12) < t.order);
        assert!(registry::info(name).is_none());
    }
}
