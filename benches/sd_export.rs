//! Streaming export of a full-size SDXL UNet (2.57B parameters, fp16, single-file CompVis/SGM layout) with FP8
//! Q/DQ, against the disk's plain sequential read + write of the same bytes.
//!
//! `cargo bench --bench sd_export` writes a synthetic checkpoint (random fp16 values, every tensor of SDXL base's
//! UNet under `model.diffusion_model.`; ~5.1 GB) under SD_BENCH_DIR (default target/sd-bench), exports it with FP8
//! weights and a fixed activation range (the default policy: time/added embeddings, time_emb_proj, conv_in/out stay
//! fp16; convolutions are not quantized) and prints wall time and peak RSS beside the time to read the checkpoint
//! and write as many bytes as the export wrote. The checkpoint's pages are dropped from the page cache before each
//! timed phase and both end with `sync`. SD_BENCH_ROUNDS (default 1) rounds, alternating which goes first. All
//! files are deleted at the end.
#[path = "common/export.rs"]
mod common;
use common::{Cleanup, drop_cache, peak_rss_bytes, plain_copy, sync};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use trt_diff::models::unet::{self, AddedConditioning, UNetConfig, UNetExportOptions, UNetLayout};
use trt_diff::quant::LinearPrecision;
use trt_diff::weights::safetensors_file::Checkpoint;

fn peak_rss_reset() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// SDXL base 1.0's UNet in the single-file layout.
fn sdxl() -> UNetConfig {
    UNetConfig {
        in_channels: 4,
        out_channels: 4,
        block_out_channels: vec![320, 640, 1280],
        layers_per_block: 2,
        heads: vec![5, 10, 20],
        down_attention: vec![false, true, true],
        up_attention: vec![true, true, false],
        cross_attention_dim: 2048,
        norm_num_groups: 32,
        norm_eps: 1e-5,
        flip_sin_to_cos: true,
        freq_shift: 0.0,
        added: Some(AddedConditioning {
            time_embed_dim: 256,
            time_ids: 6,
            text_embeds_dim: 1280,
        }),
        layout: UNetLayout::Original,
        prefix: "model.diffusion_model.".into(),
    }
}

/// Every parameter of a UNet (diffusers structure, checkpoint names) with transformer depths per level and in the
/// mid block.
fn tensor_shapes(cfg: &UNetConfig, depth: &[usize], mid_depth: usize) -> Vec<(String, Vec<usize>)> {
    let mut v: Vec<(String, Vec<usize>)> = Vec::new();
    let mut add = |name: String, shape: Vec<usize>| v.push((cfg.name(&name), shape));
    let c0 = cfg.block_out_channels[0];
    let t = 4 * c0;
    let ctx = cfg.cross_attention_dim;
    let linear =
        |add: &mut dyn FnMut(String, Vec<usize>), n: &str, o: usize, i: usize, bias: bool| {
            add(format!("{n}.weight"), vec![o, i]);
            if bias {
                add(format!("{n}.bias"), vec![o]);
            }
        };
    let norm = |add: &mut dyn FnMut(String, Vec<usize>), n: &str, c: usize| {
        add(format!("{n}.weight"), vec![c]);
        add(format!("{n}.bias"), vec![c]);
    };
    let conv = |add: &mut dyn FnMut(String, Vec<usize>), n: &str, o: usize, i: usize, k: usize| {
        add(format!("{n}.weight"), vec![o, i, k, k]);
        add(format!("{n}.bias"), vec![o]);
    };
    linear(&mut add, "time_embedding.linear_1", t, c0, true);
    linear(&mut add, "time_embedding.linear_2", t, t, true);
    if let Some(a) = &cfg.added {
        linear(
            &mut add,
            "add_embedding.linear_1",
            t,
            a.text_embeds_dim + a.time_ids * a.time_embed_dim,
            true,
        );
        linear(&mut add, "add_embedding.linear_2", t, t, true);
    }
    conv(&mut add, "conv_in", c0, cfg.in_channels, 3);
    let resnet = |add: &mut dyn FnMut(String, Vec<usize>), n: &str, i: usize, o: usize| {
        norm(add, &format!("{n}.norm1"), i);
        conv(add, &format!("{n}.conv1"), o, i, 3);
        linear(add, &format!("{n}.time_emb_proj"), o, t, true);
        norm(add, &format!("{n}.norm2"), o);
        conv(add, &format!("{n}.conv2"), o, o, 3);
        if i != o {
            conv(add, &format!("{n}.conv_shortcut"), o, i, 1);
        }
    };
    let transformer = |add: &mut dyn FnMut(String, Vec<usize>), n: &str, c: usize, d: usize| {
        let lin =
            |add: &mut dyn FnMut(String, Vec<usize>), n: String, o: usize, i: usize, bias: bool| {
                add(format!("{n}.weight"), vec![o, i]);
                if bias {
                    add(format!("{n}.bias"), vec![o]);
                }
            };
        norm(add, &format!("{n}.norm"), c);
        lin(add, format!("{n}.proj_in"), c, c, true);
        for k in 0..d {
            let b = format!("{n}.transformer_blocks.{k}");
            for (a, kv) in [("attn1", c), ("attn2", ctx)] {
                lin(add, format!("{b}.{a}.to_q"), c, c, false);
                lin(add, format!("{b}.{a}.to_k"), c, kv, false);
                lin(add, format!("{b}.{a}.to_v"), c, kv, false);
                lin(add, format!("{b}.{a}.to_out.0"), c, c, true);
            }
            for l in ["norm1", "norm2", "norm3"] {
                norm(add, &format!("{b}.{l}"), c);
            }
            lin(add, format!("{b}.ff.net.0.proj"), 8 * c, c, true);
            lin(add, format!("{b}.ff.net.2"), c, 4 * c, true);
        }
        lin(add, format!("{n}.proj_out"), c, c, true);
    };
    let n = cfg.block_out_channels.len();
    let l = cfg.layers_per_block;
    let mut prev = c0;
    for (i, &o) in cfg.block_out_channels.iter().enumerate() {
        for j in 0..l {
            resnet(
                &mut add,
                &format!("down_blocks.{i}.resnets.{j}"),
                if j == 0 { prev } else { o },
                o,
            );
            if cfg.down_attention[i] {
                transformer(
                    &mut add,
                    &format!("down_blocks.{i}.attentions.{j}"),
                    o,
                    depth[i],
                );
            }
        }
        if i + 1 < n {
            conv(
                &mut add,
                &format!("down_blocks.{i}.downsamplers.0.conv"),
                o,
                o,
                3,
            );
        }
        prev = o;
    }
    let top = cfg.block_out_channels[n - 1];
    resnet(&mut add, "mid_block.resnets.0", top, top);
    transformer(&mut add, "mid_block.attentions.0", top, mid_depth);
    resnet(&mut add, "mid_block.resnets.1", top, top);
    let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
    let mut prev = top;
    for i in 0..n {
        let o = rev[i];
        let skip_in = rev[(i + 1).min(n - 1)];
        for j in 0..=l {
            let skip = if j == l { skip_in } else { o };
            let input = if j == 0 { prev } else { o };
            resnet(
                &mut add,
                &format!("up_blocks.{i}.resnets.{j}"),
                input + skip,
                o,
            );
            if cfg.up_attention[i] {
                transformer(
                    &mut add,
                    &format!("up_blocks.{i}.attentions.{j}"),
                    o,
                    depth[n - 1 - i],
                );
            }
        }
        if i + 1 < n {
            conv(
                &mut add,
                &format!("up_blocks.{i}.upsamplers.0.conv"),
                o,
                o,
                3,
            );
        }
        prev = o;
    }
    norm(&mut add, "conv_norm_out", c0);
    conv(&mut add, "conv_out", cfg.out_channels, c0, 3);
    v
}

/// Random fp16 values of magnitude ~2^-8..2^-2 with random signs.
fn fill(buf: &mut [u8], seed: u64) {
    let mut s = seed | 1;
    for pair in buf.chunks_exact_mut(8) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let mut r = s;
        for v in pair.chunks_exact_mut(2) {
            let sign = (r & 1) as u16;
            let exp = 7 + ((r >> 1) % 6) as u16;
            let man = ((r >> 4) & 0x3ff) as u16;
            v.copy_from_slice(&((sign << 15) | (exp << 10) | man).to_le_bytes());
            r >>= 16;
        }
    }
}

fn write_checkpoint(tensors: &[(String, Vec<usize>)], path: &Path) -> u64 {
    let mut header = serde_json::Map::new();
    let mut off = 0u64;
    for (name, shape) in tensors {
        let n = shape.iter().product::<usize>() as u64 * 2;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F16", "shape": shape, "data_offsets": [off, off + n]}),
        );
        off += n;
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut f = std::io::BufWriter::with_capacity(1 << 22, std::fs::File::create(path).unwrap());
    f.write_all(&(h.len() as u64).to_le_bytes()).unwrap();
    f.write_all(&h).unwrap();
    let mut buf = vec![0u8; 64 << 20];
    let (mut left, mut seed) = (off, 1u64);
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        fill(&mut buf[..n], seed);
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
        seed += 1;
    }
    f.flush().unwrap();
    off
}

fn dir_bytes(d: &Path) -> u64 {
    std::fs::read_dir(d)
        .map(|it| {
            it.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn main() {
    let dir: PathBuf = std::env::var("SD_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/sd-bench"));
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup = Cleanup(dir.clone());
    let cfg = sdxl();
    let tensors = tensor_shapes(&cfg, &[0, 2, 10], 10);
    let params: u64 = tensors
        .iter()
        .map(|(_, s)| s.iter().product::<usize>() as u64)
        .sum();
    // SDXL base's UNet: 2,567,463,684 parameters.
    assert_eq!(
        params, 2_567_463_684,
        "the synthetic UNet's shapes do not add up to SDXL's"
    );
    let ck_path = dir.join("sdxl-unet-synthetic.safetensors");
    let out_dir = dir.join("onnx");
    let t = Instant::now();
    let ck_bytes = write_checkpoint(&tensors, &ck_path);
    sync();
    println!(
        "SDXL UNet, {:.3}B parameters: synthetic single-file checkpoint {} in {:.1} s",
        params as f64 / 1e9,
        trt_diff::fsutil::human_bytes(ck_bytes),
        t.elapsed().as_secs_f64()
    );
    let rounds: usize = std::env::var("SD_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
        .max(1);
    let gb = |b: u64| b as f64 / 1e9;
    let plain_path = dir.join("plain.bin");
    let (mut export_total, mut plain_total, mut peak_max, mut out_bytes) = (0.0, 0.0, 0u64, 0u64);
    let mut rows = Vec::new();
    let mut layers = String::new();
    for round in 0..rounds {
        for phase in 0..2 {
            if (phase == 0) == (round % 2 == 0) {
                let _ = std::fs::remove_dir_all(&out_dir);
                std::fs::create_dir_all(&out_dir).unwrap();
                drop_cache(&ck_path);
                peak_rss_reset();
                let t = Instant::now();
                let ck = Checkpoint::open(&ck_path).unwrap();
                let read_cfg = UNetConfig::from_checkpoint(&ck).unwrap();
                assert_eq!(read_cfg, cfg, "the config read off the synthetic file");
                let opts = UNetExportOptions {
                    quantize: Some(LinearPrecision::Fp8),
                    fp8_default_amax: Some(8.0),
                    compute: trt_diff::onnx::DataType::FLOAT16,
                    ..Default::default()
                };
                let r = unet::export(&cfg, &ck, &opts, &out_dir.join("unet.onnx")).unwrap();
                drop(ck);
                sync();
                let wall = t.elapsed().as_secs_f64();
                let peak = peak_rss_bytes();
                out_bytes = dir_bytes(&out_dir);
                peak_max = peak_max.max(peak);
                layers = format!("{:?}", r.layers);
                export_total += wall;
                rows.push(format!(
                    "| {} | export + FP8 (trt-diff) | {:.2} GB | {:.2} GB | {wall:.1} | {} |",
                    round + 1,
                    gb(ck_bytes),
                    gb(out_bytes),
                    trt_diff::fsutil::human_bytes(peak)
                ));
                let _ = std::fs::remove_dir_all(&out_dir);
            } else {
                let bytes = if out_bytes > 0 { out_bytes } else { params };
                drop_cache(&ck_path);
                let t = Instant::now();
                let read = plain_copy(&ck_path, &plain_path, bytes);
                sync();
                let wall = t.elapsed().as_secs_f64();
                let _ = std::fs::remove_file(&plain_path);
                plain_total += wall;
                rows.push(format!(
                    "| {} | plain read + write | {:.2} GB | {:.2} GB | {wall:.1} | - |",
                    round + 1,
                    gb(read),
                    gb(bytes)
                ));
            }
        }
    }
    println!("| round | step | bytes in | bytes out | wall s | peak RSS |");
    println!("|---|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    println!(
        "ratio export / plain over {rounds} round(s): {:.2}x (target <= 1.5x); peak RSS {:.2} GB (target <= 1 GB); \
         layers {layers}",
        export_total / plain_total,
        gb(peak_max)
    );
}
