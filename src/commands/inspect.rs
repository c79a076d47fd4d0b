//! `trt-diff inspect FILE`: a readable account of .onnx and .plan files.
use crate::fsutil::human_bytes;
use crate::manifest::{check_plan, looks_like_plan};
use crate::onnx::OnnxFile;
use crate::onnx::summary::OnnxSummary;
use anyhow::{Result, bail};
use std::io::Read;
use std::path::Path;

enum Kind {
    Onnx,
    Plan,
    Safetensors,
}

fn kind(path: &Path) -> Result<Kind> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("onnx") => return Ok(Kind::Onnx),
        Some("plan" | "engine" | "trt" | "json") => return Ok(Kind::Plan),
        Some("safetensors") => return Ok(Kind::Safetensors),
        _ => {}
    }
    let mut head = [0u8; 8];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .map_err(|e| anyhow::anyhow!("cannot open '{}': {e}; check the path", path.display()))?;
    if looks_like_plan(&head[..n]) {
        return Ok(Kind::Plan);
    }
    bail!(
        "'{}': unknown file kind; inspect reads .onnx models, .plan engines, .safetensors checkpoints and .gguf files (name the file accordingly)",
        path.display()
    )
}

/// `against`: for a quantized safetensors checkpoint, the original it was quantized from (per-tensor error).
pub fn inspect(path: &Path, json: bool, against: Option<&Path>) -> Result<()> {
    if against.is_none() && crate::weights::gguf::looks_like_gguf(path) {
        return crate::weights::gguf::inspect(path, json);
    }
    let kind = kind(path)?;
    if against.is_some() && !matches!(kind, Kind::Safetensors) {
        bail!(
            "--against compares a quantized .safetensors checkpoint with its original; '{}' is not a .safetensors file",
            path.display()
        );
    }
    match kind {
        Kind::Safetensors => {
            let mut r = crate::quant::inspect::inspect_checkpoint(path, against)?;
            r.layout = Some(
                crate::weights::prequant::file_layout(path)?
                    .name()
                    .to_string(),
            );
            if json {
                crate::outln!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print_checkpoint(&r);
            }
        }
        Kind::Onnx => {
            let s = OnnxSummary::of(&OnnxFile::load(path)?);
            if json {
                crate::outln!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print_onnx(&s);
            }
        }
        Kind::Plan => {
            let r = check_plan(path)?;
            if json {
                crate::outln!("{}", serde_json::to_string_pretty(&r.manifest)?);
                return Ok(());
            }
            let Some(m) = r.manifest else {
                crate::outln!(
                    "{}: TensorRT plan, {}",
                    r.path.display(),
                    human_bytes(r.bytes)
                );
                crate::outln!(
                    "  no manifest beside it (not built by trt-diff): nothing more is known without TensorRT"
                );
                return Ok(());
            };
            match (&m.plan, &m.tensorrt, &m.builder) {
                (Some(p), Some(t), Some(b)) => {
                    crate::outln!(
                        "{}: TensorRT plan, {}",
                        r.path.display(),
                        human_bytes(r.bytes)
                    );
                    crate::outln!("  xxh3-128    {} (matches manifest)", p.xxh3_128);
                    crate::outln!(
                        "  TensorRT    {} {} (headers {}), {}",
                        t.flavor_display(),
                        t.version,
                        t.header_version,
                        t.library
                    );
                    let targets = if t.targets.is_empty() {
                        "flavour default".to_string()
                    } else {
                        t.targets.join(", ")
                    };
                    crate::outln!("  targets     {targets}");
                    crate::outln!("  created     {} by {}", m.created, m.created_by);
                    crate::outln!(
                        "  builder     strongly typed, {} layers, opt level {}, workspace {}, refit {}, weight \
                         streaming {}",
                        b.layers,
                        b.optimization_level
                            .map(|v| v.to_string())
                            .unwrap_or_else(|| "default".into()),
                        b.workspace_bytes
                            .map(human_bytes)
                            .unwrap_or_else(|| "default".into()),
                        b.refittable,
                        b.weight_streaming
                    );
                    crate::outln!(
                        "  build time  parse {:.3}s, build {:.3}s",
                        b.parse_seconds,
                        b.build_seconds
                    );
                }
                _ => {
                    crate::outln!(
                        "{}: ONNX-only bundle (no TensorRT plan; runs on ONNX Runtime with --backend cuda or cpu)",
                        r.path.display()
                    );
                    crate::outln!("  created     {} by {}", m.created, m.created_by);
                }
            }
            let dir = r.path.parent().unwrap_or(Path::new(""));
            let kept = if dir.join(&m.source.onnx).exists() {
                ""
            } else {
                ", not kept"
            };
            crate::outln!(
                "  source      {} ({}, sha256 {}{kept})",
                m.source.onnx,
                human_bytes(m.source.bytes),
                m.source.sha256
            );
            for e in &m.source.external_data {
                crate::outln!("              + {} ({})", e.file, human_bytes(e.bytes));
            }
            for t in &m.io {
                crate::outln!("{}", t.describe());
            }
        }
    }
    Ok(())
}

fn print_checkpoint(r: &crate::quant::inspect::CheckpointReport) {
    crate::outln!(
        "{}: safetensors, {}, {} tensors, layout {}",
        r.path,
        human_bytes(r.file_bytes),
        r.tensors.len(),
        r.layout.as_deref().unwrap_or("plain")
    );
    for (k, v) in &r.metadata {
        crate::outln!("  metadata    {k} = {v}");
    }
    let errors = r.tensors.iter().any(|t| t.error.is_some());
    for t in &r.tensors {
        let shape = t
            .shape
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("x");
        let err = t
            .error
            .as_ref()
            .map(|e| {
                format!(
                    "  rmse {:.3e}  max {:.3e}  sqnr {:.2} dB",
                    e.rmse, e.max_abs, e.sqnr_db
                )
            })
            .unwrap_or_default();
        crate::outln!(
            "  {:<48} {:<8} {:<7} {:<16} {:>10}{err}",
            t.name,
            t.format.as_deref().unwrap_or("-"),
            t.dtype,
            shape,
            human_bytes(t.bytes)
        );
    }
    if !errors && r.tensors.iter().any(|t| t.format.is_some()) {
        crate::outln!("  (add --against ORIGINAL.safetensors for each quantized tensor's error)");
    }
}

fn print_onnx(s: &OnnxSummary) {
    crate::outln!(
        "{}: ONNX IR {}, {}, produced by {}",
        s.path,
        s.ir_version,
        human_bytes(s.file_bytes),
        s.producer
    );
    let opsets: Vec<String> = s.opsets.iter().map(|(d, v)| format!("{d} {v}")).collect();
    crate::outln!("  opsets      {}", opsets.join(", "));
    for (label, list) in [("input", &s.inputs), ("output", &s.outputs)] {
        for t in list {
            crate::outln!(
                "  {label:<6}      {:<24} {:<12} [{}]",
                t.name,
                t.dtype,
                t.shape.join(", ")
            );
        }
    }
    crate::outln!("  nodes       {}", s.nodes);
    for (op, n) in &s.op_histogram {
        crate::outln!("              {n:>6} {op}");
    }
    crate::outln!("  initializers");
    for (dt, b) in &s.initializers {
        crate::outln!(
            "              {:<14} {:>6} tensors  {:>12} inline  {:>12} external",
            dt,
            b.count,
            human_bytes(b.inline_bytes),
            human_bytes(b.external_bytes)
        );
    }
    if !s.external_files.is_empty() {
        crate::outln!("  external    {}", s.external_files.join(", "));
    }
    if !s.qdq.is_empty() {
        crate::outln!("  quantization ({} Q/DQ nodes)", s.qdq.len());
        for q in &s.qdq {
            crate::outln!(
                "              {:<32} {:<24} {:<40} {}",
                q.node,
                q.op,
                q.format,
                q.granularity
            );
        }
    }
}
