//! Tableaux: RES4LYF's numbers transcribed exactly (golden file from scripts/golden/samplers_res4lyf.py), and
//! every registered tableau meets the order conditions of its claimed order to 1e-12.
use crate::common;
use common::samplers::{golden, vecf};
use trt_diff::samplers::registry;
use trt_diff::samplers::tableau::{
    Kind, TREE_ORDER_MAX, Tableau, Trees, order_residuals, proven_order, simplifying, tree_order,
};
use trt_diff::samplers::tableau_data::TABLEAUX;
use trt_diff::samplers::tableau_fix;

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
        // Tree conditions up to min(order, 9) to 1e-12 ...
        let res = order_residuals(t, t.order.min(TREE_ORDER_MAX));
        for (k, r) in res.iter().enumerate() {
            assert!(*r <= 1e-12, "{} order {} residual {r:e}", t.name, k + 1);
        }
        // ... and beyond 9 Butcher's simplifying assumptions B(p), C(q), D(r).
        if t.order > TREE_ORDER_MAX {
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

/// RES4LYF tableaux whose published coefficients fail the order conditions are registered corrected (see
/// `tableau_fix::FIXES`). This list pins which (if RES4LYF fixes one, the golden changes and this test says so).
#[test]
fn defective_res4lyf_tableaux_are_corrected() {
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
    let mut fixed: Vec<&str> = tableau_fix::FIXES.iter().map(|f| f.name).collect();
    fixed.sort();
    assert_eq!(fixed, want);
    for name in want {
        let published = TABLEAUX.iter().find(|t| t.name == name).unwrap();
        assert!(proven_order(published, 1e-12) < published.order, "{name}");
        let t = tableau_fix::corrected(name).unwrap();
        // Registered corrected, with exactly the order it proves (not more: the claim is sharp).
        let info = registry::info(name).unwrap_or_else(|| panic!("{name} not registered"));
        assert_eq!(info.order, t.order, "{name}");
        assert_eq!(info.stages, t.stages(), "{name}");
        let proven = proven_order(t, 1e-12);
        assert_eq!(proven, t.order, "{name}: proves {proven}");
        assert!(registry::tableaux().iter().any(|r| std::ptr::eq(*r, t)));
    }
}

fn pubtab(name: &str) -> &'static Tableau {
    TABLEAUX.iter().find(|t| t.name == name).unwrap()
}
fn fixtab(name: &str) -> &'static Tableau {
    tableau_fix::corrected(name).unwrap()
}
/// |published - ours| <= tol for every entry except the listed (i, j) of a, which must differ by > 10 tol
/// (so the named typos are real and are all there is).
fn close_except(name: &str, tol: f64, typos: &[(usize, usize)]) {
    let (p, t) = (pubtab(name), fixtab(name));
    for (x, y) in p.b.iter().zip(t.b).chain(p.c.iter().zip(t.c)) {
        assert!((x - y).abs() <= tol, "{name}: b/c {x} vs {y}");
    }
    for i in 0..t.stages() {
        for j in 0..t.stages() {
            let d = (p.a[i][j] - t.a[i][j]).abs();
            if typos.contains(&(i, j)) {
                assert!(
                    d > 10.0 * tol,
                    "{name} a[{i}][{j}]: typo expected, differs {d:e}"
                );
            } else {
                assert!(
                    d <= tol,
                    "{name} a[{i}][{j}]: {} vs {}",
                    p.a[i][j],
                    t.a[i][j]
                );
            }
        }
    }
}

/// Each correction keeps RES4LYF's numbers wherever they were right: to the precision RES4LYF gives them
/// (exact values to 1e-14; its surd approximations of Gauss nodes to their own accuracy), and where it has
/// a typo exactly the entries of the typo differ, each in the way named here (and in README).
#[test]
fn corrections_equal_res4lyf_except_the_named_typos() {
    // gauss-legendre_diag_8s: published a = mu_ij = a_ij / b_j on and below the diagonal, 0 above.
    let (p, t) = (
        pubtab("gauss-legendre_diag_8s"),
        fixtab("gauss-legendre_diag_8s"),
    );
    for (x, y) in p.b.iter().zip(t.b).chain(p.c.iter().zip(t.c)) {
        assert!((x - y).abs() < 1e-15, "diag_8s b/c {x} vs {y}");
    }
    for i in 0..8 {
        for j in 0..8 {
            if j <= i {
                let mu = t.a[i][j] / t.b[j];
                assert!((p.a[i][j] - mu).abs() < 1e-13, "diag_8s mu[{i}][{j}]");
                // symplectic: mu_ij + mu_ji = 1
                assert!((mu + t.a[j][i] / t.b[i] - 1.0).abs() < 1e-13);
            } else {
                assert_eq!(p.a[i][j], 0.0);
                assert!(t.a[i][j] != 0.0);
            }
        }
    }
    // gauss-legendre_5s: sqrt(739) approximations to 3e-4, and a[4][1] <-> a[4][2] swapped.
    close_except("gauss-legendre_5s", 3e-4, &[(4, 1), (4, 2)]);
    let (p, t) = (pubtab("gauss-legendre_5s"), fixtab("gauss-legendre_5s"));
    assert!((p.a[4][1] - t.a[4][2]).abs() < 3e-4 && (p.a[4][2] - t.a[4][1]).abs() < 3e-4);
    // gauss-legendre_5s_ascending: its stages are ours in the order (c2, c1, c3, c5, c4) (it believed
    // 1/2 - 99 sqrt(739)/10000 the smallest node), its columns still in gauss-legendre_5s's stage order
    // (c3, c2, c4, c1, c5), and the 5s typo carried along (the c5 row, columns 1 and 2).
    let (p, t) = (
        pubtab("gauss-legendre_5s_ascending"),
        fixtab("gauss-legendre_5s_ascending"),
    );
    let (q, r) = ([1usize, 0, 2, 4, 3], [2usize, 1, 3, 0, 4]);
    for (i, &qi) in q.iter().enumerate() {
        assert!((p.c[i] - t.c[qi]).abs() < 3e-4 && (p.b[i] - t.b[qi]).abs() < 3e-4);
        for j in 0..5 {
            let jj = if i == 3 && j == 1 {
                2
            } else if i == 3 && j == 2 {
                1
            } else {
                j
            };
            assert!(
                (p.a[i][j] - t.a[qi][r[jj]]).abs() < 3e-4,
                "5s_ascending a[{i}][{j}]"
            );
        }
    }
    assert!((1..5).all(|i| t.c[i] > t.c[i - 1]));
    // gauss-legendre_4s_alt: the paper's approximations to 3e-5; a[1][0] <-> a[1][3] swapped, a[1][1] ten
    // times too small, a[2][3] = 8978/117375 + x where the method has 8978/117375 - x.
    close_except(
        "gauss-legendre_4s_alt",
        3e-5,
        &[(1, 0), (1, 1), (1, 3), (2, 3)],
    );
    let (p, t) = (
        pubtab("gauss-legendre_4s_alt"),
        fixtab("gauss-legendre_4s_alt"),
    );
    assert!((p.a[1][0] - t.a[1][3]).abs() < 3e-5 && (p.a[1][3] - t.a[1][0]).abs() < 3e-5);
    assert!((10.0 * p.a[1][1] - t.a[1][1]).abs() < 3e-5);
    assert!((p.a[2][3] + t.a[2][3] - 2.0 * 8978.0 / 117375.0).abs() < 3e-5);
    // The sqrt(15) "4-stage" ones have two distinct nodes, so no entry carries over; ours keep their c
    // pattern below/above 1/2 where it is possible (alternating, ascending) and gauss-legendre_4s's b.
    for (name, keep_c) in [
        ("gauss-legendre_4s", false),
        ("gauss-legendre_4s_alternating_a", true),
        ("gauss-legendre_4s_ascending_a", true),
    ] {
        let (p, t) = (pubtab(name), fixtab(name));
        let mut distinct: Vec<f64> = p.c.to_vec();
        distinct.sort_by(f64::total_cmp);
        distinct.dedup();
        assert_eq!(distinct.len(), 2, "{name}");
        if keep_c {
            for i in 0..4 {
                assert_eq!(p.c[i] < 0.5, t.c[i] < 0.5, "{name} c[{i}]");
            }
        } else {
            for i in 0..4 {
                assert_eq!(p.b[i] < 0.25, t.b[i] < 0.25, "{name} b[{i}]");
            }
        }
    }
    // radau_iia_4s: only c_4 = 1 is right; a is empty.
    let (p, t) = (pubtab("radau_iia_4s"), fixtab("radau_iia_4s"));
    assert_eq!((p.c[3], t.c[3]), (1.0, 1.0));
    assert!(p.a.iter().all(|r| r.iter().all(|&v| v == 0.0)));
    assert!((0..3).all(|i| (p.c[i] - t.c[i]).abs() > 1e-2));
    // radau_ia_3s: a[2][1], a[2][2] have the signs of their sqrt(6) terms swapped.
    close_except("radau_ia_3s", 1e-15, &[(2, 1), (2, 2)]);
    let (p, t) = (pubtab("radau_ia_3s"), fixtab("radau_ia_3s"));
    for j in [1, 2] {
        assert!((p.a[2][j] + t.a[2][j] - 22.0 / 45.0).abs() < 1e-15);
    }
    // kraaijevanger_spijker_2s: unchanged, order corrected.
    close_except("kraaijevanger_spijker_2s", 0.0, &[]);
    assert_eq!(tree_order(fixtab("kraaijevanger_spijker_2s"), 8, 1e-12), 1);
    // verner_13s: RES4LYF's 13 nodes are Verner 9(8)'s c_2..c_14.
    let (p, t) = (pubtab("verner_13s"), fixtab("verner_13s"));
    same(p.c, &t.c[1..14], "verner c");
    // rk5_7s: a[4][3] and a[5][0] have the wrong sign.
    close_except("rk5_7s", 1e-15, &[(4, 3), (5, 0)]);
    let (p, t) = (pubtab("rk5_7s"), fixtab("rk5_7s"));
    assert!(p.a[4][3] == -t.a[4][3] && p.a[5][0] == -t.a[5][0]);
}

/// The generated collocation methods against known exact values (Hairer-Wanner's tables).
#[test]
fn collocation_generator_matches_known_tableaux() {
    for (made, known) in [
        (
            tableau_fix::collocation(pubtab("gauss-legendre_3s").c),
            "gauss-legendre_3s",
        ),
        (
            tableau_fix::collocation(pubtab("radau_iia_3s").c),
            "radau_iia_3s",
        ),
        (
            tableau_fix::collocation(pubtab("lobatto_iiia_3s").c),
            "lobatto_iiia_3s",
        ),
    ] {
        let k = pubtab(known);
        for i in 0..k.stages() {
            for j in 0..k.stages() {
                assert!(
                    (made.0[i][j] - k.a[i][j]).abs() < 1e-15,
                    "{known} a[{i}][{j}]"
                );
            }
            assert!((made.1[i] - k.b[i]).abs() < 1e-15, "{known} b");
        }
    }
    let (x, w) = tableau_fix::gauss_legendre01(3);
    let r = tableau_fix::radau_iia_nodes(3);
    for (got, want) in [
        (&x[..], pubtab("gauss-legendre_3s").c),
        (&w[..], pubtab("gauss-legendre_3s").b),
        (&r[..], pubtab("radau_iia_3s").c),
    ] {
        for (g, k) in got.iter().zip(want) {
            assert!((g - k).abs() < 1e-15, "{g} vs {k}");
        }
    }
}
