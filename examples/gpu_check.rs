//! GPU checks and benchmarks for the runtime issue, run on the lent H100/H200 (scripts/gpu/run.sh):
//! device round trip; every kernel against its host implementation on fresh random inputs (bit-identical);
//! TensorRT-RTX's runtime on a plan built on the CPU machine (expected: a clean refusal on Hopper); timings of
//! the linear-combination kernel against a device-to-device copy and of one Euler step with CFG on a Flux
//! 1024x1024 latent. Prints tables and one JSON line (`RESULT {...}`).
use anyhow::Result;
use cudarc::driver::CudaSlice;
use std::time::Instant;
use trt_diff::cuda::buffer::DeviceBuffer;
use trt_diff::cuda::device::Device;
use trt_diff::cuda::host;
use trt_diff::samplers::buffer::Buffer;
use trt_diff::samplers::noise::{PhiloxNoise, fill_normal_host};
use trt_diff::samplers::registry::{self, SamplerOptions};
use trt_diff::samplers::schedule;
use trt_diff::samplers::stepper::sample;

struct Rng(u64);
impl Rng {
    fn f32(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 8.0 - 4.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }
}

fn mismatches(a: &[f32], b: &[f32]) -> usize {
    a.iter()
        .zip(b)
        .filter(|(x, y)| x.to_bits() != y.to_bits())
        .count()
}

fn up(d: &Device, v: &[f32]) -> Result<CudaSlice<f32>> {
    Ok(d.stream.clone_htod(v)?)
}
fn down(d: &Device, v: &CudaSlice<f32>) -> Result<Vec<f32>> {
    Ok(d.stream.clone_dtoh(v)?)
}

fn time_ms(d: &Device, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    d.synchronize()?;
    let t = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    d.synchronize()?;
    Ok(t.elapsed().as_secs_f64() * 1e3 / iters as f64)
}

fn main() -> Result<()> {
    let plan = std::env::args().nth(1);
    let d = Device::open(0)?;
    println!(
        "GPU: {} ({}), {} MiB",
        d.info.name,
        d.info.sm(),
        d.info.memory_bytes >> 20
    );
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut checks: Vec<(String, usize, usize)> = Vec::new();

    // Round trip of raw bytes.
    let bytes: Vec<u8> = (0..(1 << 20)).map(|i| (i * 7 % 251) as u8).collect();
    let dev = d.stream.clone_htod(&bytes)?;
    let back: Vec<u8> = d.stream.clone_dtoh(&dev)?;
    checks.push((
        "round trip 1 MiB".into(),
        bytes.iter().zip(&back).filter(|(a, b)| a != b).count(),
        bytes.len(),
    ));

    // lincomb against the samplers' host implementation, every term count, beta 0 and not.
    let n = 1 << 20;
    let xs: Vec<Vec<f32>> = (0..8).map(|_| rng.vec(n)).collect();
    let dx: Vec<CudaSlice<f32>> = xs.iter().map(|x| up(&d, x)).collect::<Result<_>>()?;
    let coefs = [0.7f64, -1.25, 0.3333333333, 2.5, -0.125, 1e-3, 3.75, -0.5];
    for k in 0..=8 {
        for beta in [0.0f64, 1.3] {
            let init = rng.vec(n);
            let mut host_out = init.clone();
            let terms: Vec<(f64, &Vec<f32>)> = (0..k).map(|i| (coefs[i], &xs[i])).collect();
            host_out.lincomb_raw(beta, &terms)?;
            let mut dev_out = up(&d, &init)?;
            let dterms: Vec<(f32, &CudaSlice<f32>)> =
                (0..k).map(|i| (coefs[i] as f32, &dx[i])).collect();
            d.lincomb(&mut dev_out, beta as f32, &dterms)?;
            checks.push((
                format!("lincomb k={k} beta={beta}"),
                mismatches(&down(&d, &dev_out)?, &host_out),
                n,
            ));
        }
    }
    // CFG.
    let mut host_cfg = vec![0f32; n];
    host::cfg(&mut host_cfg, &xs[0], &xs[1], 3.5);
    let mut dev_cfg = up(&d, &vec![0f32; n])?;
    d.cfg(&mut dev_cfg, &dx[0], &dx[1], 3.5)?;
    checks.push(("cfg".into(), mismatches(&down(&d, &dev_cfg)?, &host_cfg), n));
    // Philox noise, several seeds and streams, odd length.
    for (seed, stream) in [(0u64, 0u64), (42, 7), (0xDEAD_BEEF_1234, 1 << 33)] {
        let m = (1 << 24) + 3;
        let mut host_noise = vec![0f32; m];
        fill_normal_host(&mut host_noise, seed, stream);
        let mut dev_noise = up(&d, &vec![0f32; m])?;
        d.fill_normal(&mut dev_noise, seed, stream)?;
        checks.push((
            format!("philox seed={seed} stream={stream}"),
            mismatches(&down(&d, &dev_noise)?, &host_noise),
            m,
        ));
    }
    // Casts: random values plus specials; every f16 and bf16 bit pattern back to f32.
    let mut vals = rng.vec(n);
    vals.extend([
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        65504.0,
        65520.0,
        1e-8,
        5.96e-8,
        3e38,
        f32::MIN_POSITIVE,
    ]);
    let dv = up(&d, &vals)?;
    let mut h16 = d.stream.alloc_zeros::<u16>(vals.len())?;
    d.f32_to_f16(&mut h16, &dv)?;
    let got: Vec<u16> = d.stream.clone_dtoh(&h16)?;
    let want: Vec<u16> = vals
        .iter()
        .map(|v| half::f16::from_f32(*v).to_bits())
        .collect();
    checks.push((
        "f32->f16".into(),
        got.iter().zip(&want).filter(|(a, b)| a != b).count(),
        vals.len(),
    ));
    d.f32_to_bf16(&mut h16, &dv)?;
    let got: Vec<u16> = d.stream.clone_dtoh(&h16)?;
    let want: Vec<u16> = vals
        .iter()
        .map(|v| half::bf16::from_f32(*v).to_bits())
        .collect();
    checks.push((
        "f32->bf16".into(),
        got.iter().zip(&want).filter(|(a, b)| a != b).count(),
        vals.len(),
    ));
    let all: Vec<u16> = (0..=u16::MAX).collect();
    let dall = d.stream.clone_htod(&all)?;
    let mut f = up(&d, &vec![0f32; all.len()])?;
    d.f16_to_f32(&mut f, &dall)?;
    let got = down(&d, &f)?;
    let want: Vec<f32> = all
        .iter()
        .map(|b| half::f16::from_bits(*b).to_f32())
        .collect();
    let bad = got
        .iter()
        .zip(&want)
        .filter(|(a, b)| a.to_bits() != b.to_bits() && !(a.is_nan() && b.is_nan()))
        .count();
    checks.push(("f16->f32 (all 65536)".into(), bad, all.len()));
    d.bf16_to_f32(&mut f, &dall)?;
    let got = down(&d, &f)?;
    let want: Vec<f32> = all
        .iter()
        .map(|b| half::bf16::from_bits(*b).to_f32())
        .collect();
    let bad = got
        .iter()
        .zip(&want)
        .filter(|(a, b)| a.to_bits() != b.to_bits() && !(a.is_nan() && b.is_nan()))
        .count();
    checks.push(("bf16->f32 (all 65536)".into(), bad, all.len()));
    // Flux pack / unpack.
    let bchw = [2, 16, 64, 96];
    let lat = rng.vec(bchw.iter().product());
    let dl = up(&d, &lat)?;
    let mut packed = up(&d, &vec![0f32; lat.len()])?;
    d.flux_pack(&mut packed, &dl, bchw)?;
    let hp = host::flux_pack(&lat, bchw);
    checks.push((
        "flux pack".into(),
        mismatches(&down(&d, &packed)?, &hp),
        lat.len(),
    ));
    let mut unpacked = up(&d, &vec![0f32; lat.len()])?;
    d.flux_unpack(&mut unpacked, &packed, bchw)?;
    checks.push((
        "flux unpack".into(),
        mismatches(&down(&d, &unpacked)?, &lat),
        lat.len(),
    ));

    println!("\n| check | mismatching elements | elements |\n|---|---|---|");
    for (name, bad, total) in &checks {
        println!("| {name} | {bad} | {total} |");
    }

    // Bandwidth: 64M f32 elements.
    let big = 64 << 20;
    let a = d.stream.alloc_zeros::<f32>(big)?;
    let b2 = d.stream.alloc_zeros::<f32>(big)?;
    let mut o = d.stream.alloc_zeros::<f32>(big)?;
    let gb = |bytes: f64, ms: f64| bytes / (ms * 1e-3) / 1e9;
    let copy_ms = time_ms(&d, 50, || Ok(d.stream.memcpy_dtod(&a, &mut o)?))?;
    let lin1_ms = time_ms(&d, 50, || d.lincomb(&mut o, 0.0, &[(0.5, &a)]))?;
    let lin2_ms = time_ms(&d, 50, || d.lincomb(&mut o, 1.0, &[(0.5, &a), (0.25, &b2)]))?;
    let bytes = (big * 4) as f64;
    println!(
        "\n| operation on 64M f32 | ms | GB/s (read + written) | vs copy |\n|---|---|---|---|"
    );
    let copy_bw = gb(2.0 * bytes, copy_ms);
    println!("| device-to-device copy | {copy_ms:.3} | {copy_bw:.0} | 100% |");
    let l1 = gb(2.0 * bytes, lin1_ms);
    println!(
        "| lincomb 1 term (out = c x) | {lin1_ms:.3} | {l1:.0} | {:.0}% |",
        100.0 * l1 / copy_bw
    );
    let l2 = gb(4.0 * bytes, lin2_ms);
    println!(
        "| lincomb 2 terms + beta (out = out + c0 x0 + c1 x1) | {lin2_ms:.3} | {l2:.0} | {:.0}% |",
        100.0 * l2 / copy_bw
    );

    // One Euler step with CFG on a Flux 1024x1024 latent (16x128x128): d = cfg(uncond, cond); x = x + dt * d.
    let m = 16 * 128 * 128;
    let unc = up(&d, &rng.vec(m))?;
    let con = up(&d, &rng.vec(m))?;
    let mut x = up(&d, &rng.vec(m))?;
    let mut den = up(&d, &vec![0f32; m])?;
    let step_us = 1e3
        * time_ms(&d, 2000, || {
            d.cfg(&mut den, &unc, &con, 3.5)?;
            d.lincomb(&mut x, 1.0, &[(-0.05, &den)])
        })?;
    println!(
        "\nEuler step with CFG on 16x128x128 f32: {step_us:.2} us per step (2 kernel launches)"
    );

    // Whole samplers on device buffers against the same samplers on host Vec<f32>: the steppers only call
    // Buffer::lincomb and fill_normal, so the results must be bit-identical. The denoiser is the exact one for
    // Gaussian data with a shared std s (D = a x + b mu, scalar a, b), itself a lincomb.
    let m = 4096 * 3 + 5;
    let mu_h: Vec<f32> = rng.vec(m).iter().map(|v| v * 0.2).collect();
    let x0_h = rng.vec(m);
    let mu_d = DeviceBuffer::from_host(&d, &mu_h)?;
    let sig = schedule::karras(12, 0.03, 14.6, 7.0);
    // RES4LYF's substep noise, its swap-form step noise and bongmath (RES4LYF's node defaults) run the same
    // lincomb/noise code on both.
    let res4lyf = SamplerOptions {
        noise_mode: trt_diff::samplers::noise_mode::NoiseMode::Hard,
        eta: 0.5,
        noise_swap: true,
        eta_substep: 0.5,
        noise_anchor: 1.0,
        bongmath: true,
        ..Default::default()
    };
    for (name, opts) in [
        "euler",
        "heun",
        "dpmpp_2m",
        "res_2s",
        "res_3m",
        "euler_ancestral",
        "dpmpp_2m_sde",
    ]
    .into_iter()
    .map(|n| (n, SamplerOptions::default()))
    .chain([("res_3s", res4lyf.clone()), ("rk4_4s", res4lyf.clone())])
    {
        let label = if opts.eta_substep != 0.0 {
            format!("{name} (RES4LYF defaults: eta/eta_substep 0.5, bongmath)")
        } else {
            name.to_string()
        };
        let s2 = 0.25f64;
        let coef = move |sigma: f64| {
            (
                s2 / (s2 + sigma * sigma),
                sigma * sigma / (s2 + sigma * sigma),
            )
        };
        let mut host_x = x0_h.clone();
        let mut hs = registry::build::<Vec<f32>>(name, &opts)?;
        let mut hden = |x: &Vec<f32>, sigma: f64, out: &mut Vec<f32>| {
            let (a, b) = coef(sigma);
            out.lincomb(0.0, &[(a, x), (b, &mu_h)])
        };
        let mut hn = PhiloxNoise {
            seed: 7,
            next_stream: 0,
        };
        sample(
            hs.as_mut(),
            &mut hden,
            &mut hn,
            &mut host_x,
            &sig,
            &mut |_, _| {},
        )?;
        let mut dev_x = DeviceBuffer::from_host(&d, &x0_h)?;
        let mut ds = registry::build::<DeviceBuffer>(name, &opts)?;
        let mut dden = |x: &DeviceBuffer, sigma: f64, out: &mut DeviceBuffer| {
            let (a, b) = coef(sigma);
            out.lincomb(0.0, &[(a, x), (b, &mu_d)])
        };
        let mut dn = PhiloxNoise {
            seed: 7,
            next_stream: 0,
        };
        sample(
            ds.as_mut(),
            &mut dden,
            &mut dn,
            &mut dev_x,
            &sig,
            &mut |_, _| {},
        )?;
        let got = dev_x.to_host()?;
        checks.push((
            format!("sampler {label} (12 steps) device vs host"),
            mismatches(&got, &host_x),
            m,
        ));
    }

    // TensorRT-RTX runtime on a plan built on the CPU machine.
    let mut trt = serde_json::Map::new();
    if let Some(plan) = plan {
        let p = std::path::Path::new(&plan);
        let file = trt_diff::manifest::EngineFile::open(p)?;
        let with_manifest = trt_diff::trt::runtime::TrtEngine::open(&file)
            .err()
            .map(|e| format!("{e:#}"));
        println!(
            "\nTensorRT-RTX with manifest check: {}",
            with_manifest.clone().unwrap_or_else(|| "loaded".into())
        );
        trt.insert("with_manifest".into(), with_manifest.into());
        // What --backend auto decides for this plan (it falls back to the CPU with this reason).
        let auto = match trt_diff::trt::runtime::plan_runs_here(&file) {
            Ok(gpu) => format!("TensorRT on {gpu}"),
            Err(why) => format!("CPU backend: {why}"),
        };
        println!("--backend auto would choose: {auto}");
        trt.insert("auto".into(), auto.into());
        let bare = std::env::temp_dir().join("bare.plan");
        std::fs::copy(p, &bare)?;
        let without = trt_diff::manifest::EngineFile::open(&bare)
            .and_then(|f| trt_diff::trt::runtime::TrtEngine::open(&f))
            .err()
            .map(|e| format!("{e:#}"));
        println!(
            "TensorRT-RTX deserializing directly (no manifest): {}",
            without.clone().unwrap_or_else(|| "loaded".into())
        );
        trt.insert("without_manifest".into(), without.into());
    }
    let result = serde_json::json!({
        "gpu": d.info.name, "sm": d.info.sm(),
        "checks": checks.iter().map(|(n, b, t)| serde_json::json!({"name": n, "mismatches": b, "elements": t})).collect::<Vec<_>>(),
        "copy_gbps": copy_bw, "lincomb1_gbps": l1, "lincomb2_gbps": l2, "euler_cfg_step_us": step_us, "tensorrt": trt,
    });
    println!("RESULT {result}");
    Ok(())
}
