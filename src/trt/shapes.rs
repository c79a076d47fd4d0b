//! Optimization-profile shapes: parsing `--shapes name=MIN:OPT:MAX` and filling in defaults for the dynamic
//! inputs the user did not name.
use crate::onnx::Dim;
use anyhow::{Result, bail};

pub use crate::manifest::ShapeRange;

fn parse_dims(s: &str, whole: &str) -> Result<Vec<i64>> {
    s.split('x')
        .map(|d| {
            d.trim().parse::<i64>().ok().filter(|&v| v >= 0).ok_or_else(|| {
                anyhow::anyhow!(
                    "--shapes '{whole}': '{d}' is not a dimension (whole numbers >= 0 joined by x, e.g. \
                     tokens=1x10x32:2x10x32:8x10x32; 0 allows empty inputs such as a first-step KV cache)"
                )
            })
        })
        .collect()
}

/// Parses `name=MIN:OPT:MAX` (or `name=DIMS` for a fixed shape); several may be joined by commas.
pub fn parse_shapes(args: &[String]) -> Result<Vec<ShapeRange>> {
    let mut out: Vec<ShapeRange> = Vec::new();
    for item in args
        .iter()
        .flat_map(|a| a.split(','))
        .filter(|s| !s.trim().is_empty())
    {
        let Some((name, spec)) = item.rsplit_once('=') else {
            bail!(
                "--shapes '{item}': expected NAME=MIN:OPT:MAX, e.g. tokens=1x10x32:2x10x32:8x10x32"
            );
        };
        let parts: Vec<&str> = spec.split(':').collect();
        let (min, opt, max) = match parts.as_slice() {
            [one] => {
                let d = parse_dims(one, item)?;
                (d.clone(), d.clone(), d)
            }
            [a, b, c] => (
                parse_dims(a, item)?,
                parse_dims(b, item)?,
                parse_dims(c, item)?,
            ),
            _ => bail!(
                "--shapes '{item}': give one shape or three (MIN:OPT:MAX), not {}",
                parts.len()
            ),
        };
        if min.len() != opt.len() || opt.len() != max.len() {
            bail!("--shapes '{item}': MIN, OPT and MAX have different ranks");
        }
        for i in 0..min.len() {
            if !(min[i] <= opt[i] && opt[i] <= max[i]) {
                bail!("--shapes '{item}': dimension {i} needs MIN <= OPT <= MAX");
            }
        }
        let name = name.trim().to_string();
        if out.iter().any(|r| r.name == name) {
            bail!("--shapes names input '{name}' twice");
        }
        out.push(ShapeRange {
            name,
            min,
            opt,
            max,
        });
    }
    Ok(out)
}

/// Default (min, opt, max) for a dynamic dimension, chosen by its symbolic name. Pass --shapes to override.
type Range = (i64, i64, i64);
const DEFAULT_RANGES: &[(&[&str], Range)] = &[
    (&["batch"], (1, 1, 16)),
    (&["seq", "token", "len", "context", "past"], (1, 128, 4096)),
    (&["height", "width"], (32, 128, 256)),
];
const FALLBACK_RANGE: Range = (1, 1, 64);

fn default_range(sym: &str) -> Range {
    let s = sym.to_ascii_lowercase();
    DEFAULT_RANGES
        .iter()
        .find(|(keys, _)| keys.iter().any(|k| s.contains(k)))
        .map(|(_, r)| *r)
        .unwrap_or(FALLBACK_RANGE)
}

/// One range per input that has a dynamic dimension, from the user's ranges or the defaults. Errors name the
/// input when a user range does not fit the model (unknown name, wrong rank, contradicting a fixed dimension).
pub fn resolve_profiles(
    inputs: &[(String, Vec<Dim>)],
    user: &[ShapeRange],
) -> Result<Vec<ShapeRange>> {
    for r in user {
        if !inputs.iter().any(|(n, _)| *n == r.name) {
            let names: Vec<&str> = inputs.iter().map(|(n, _)| n.as_str()).collect();
            bail!(
                "--shapes names '{}', which is not an input of the model (inputs: {})",
                r.name,
                names.join(", ")
            );
        }
    }
    let mut out = Vec::new();
    for (name, dims) in inputs {
        let dynamic = dims
            .iter()
            .any(|d| matches!(d, Dim::Sym(_) | Dim::Fixed(..=0)));
        if let Some(r) = user.iter().find(|r| r.name == *name) {
            if r.min.len() != dims.len() {
                bail!(
                    "--shapes '{name}': {} dimensions given, the model's input has {} ({})",
                    r.min.len(),
                    dims.len(),
                    show(dims)
                );
            }
            for (i, d) in dims.iter().enumerate() {
                if let Dim::Fixed(v) = d
                    && *v > 0
                    && (r.min[i] != *v || r.max[i] != *v)
                {
                    bail!(
                        "--shapes '{name}': dimension {i} is fixed to {v} in the model ({})",
                        show(dims)
                    );
                }
            }
            out.push(r.clone());
        } else if dynamic {
            let mut r = ShapeRange {
                name: name.clone(),
                min: vec![],
                opt: vec![],
                max: vec![],
            };
            for d in dims {
                let (a, b, c) = match d {
                    Dim::Fixed(v) if *v > 0 => (*v, *v, *v),
                    Dim::Sym(s) => default_range(s),
                    Dim::Fixed(_) => FALLBACK_RANGE,
                };
                r.min.push(a);
                r.opt.push(b);
                r.max.push(c);
            }
            tracing::warn!(
                "input '{name}' ({}) is dynamic and has no --shapes: using {name}={r}",
                show(dims),
            );
            out.push(r);
        }
    }
    Ok(out)
}

fn show(dims: &[Dim]) -> String {
    let parts: Vec<String> = dims
        .iter()
        .map(|d| match d {
            Dim::Fixed(v) if *v > 0 => v.to_string(),
            Dim::Fixed(_) => "?".into(),
            Dim::Sym(s) if s.is_empty() => "?".into(),
            Dim::Sym(s) => s.clone(),
        })
        .collect();
    format!("[{}]", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ranges_and_fixed_shapes() {
        let r = parse_shapes(&["tokens=1x10x32:2x10x32:8x10x32,mask=4x4".into()]).unwrap();
        assert_eq!(r[0].min, vec![1, 10, 32]);
        assert_eq!(r[0].max, vec![8, 10, 32]);
        assert_eq!(r[1].opt, vec![4, 4]);
    }

    #[test]
    fn rejects_bad_ranges() {
        for bad in ["x=1x2:3", "x=8:4:2", "x=1x2:1:1x2", "x", "x=-1", "x=ax1"] {
            assert!(parse_shapes(&[bad.into()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn defaults_follow_dimension_names() {
        let inputs = vec![
            (
                "ids".to_string(),
                vec![Dim::Sym("batch".into()), Dim::Sym("seq_len".into())],
            ),
            ("fixed".to_string(), vec![Dim::Fixed(3)]),
        ];
        let p = resolve_profiles(&inputs, &[]).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].min, vec![1, 1]);
        assert_eq!(p[0].max, vec![16, 4096]);
        let bad = parse_shapes(&["fixed=4".into()]).unwrap();
        assert!(resolve_profiles(&inputs, &bad).is_err());
        let unknown = parse_shapes(&["nope=4".into()]).unwrap();
        assert!(resolve_profiles(&inputs, &unknown).is_err());
    }
}
