//! ort_cuda_check LIBONNXRUNTIME MODEL_DIR
//!
//! Loads ONNX Runtime from LIBONNXRUNTIME the way trt-diff does (`ort::init_from`), creates a session with the CUDA
//! execution provider registered with `error_on_failure` and `session.disable_cpu_ep_fallback=1` (so a session
//! exists only if every node runs on CUDA), then:
//!   1. runs with host tensors and compares against the float64 reference in MODEL_DIR (written by
//!      scripts/gpu/ort_cuda_model.py);
//!   2. runs through an IoBinding whose inputs are tensors in CUDA memory (ORT's CUDA allocator), one output bound
//!      with `bind_output_to_device` (MemoryInfo "Cuda") and one bound to a pre-allocated CUDA tensor, and also
//!      one input bound as a raw device pointer (`TensorRefMut::from_raw`, how cudarc buffers would be bound);
//!   3. times session creation, first run and the median of 200 IoBinding runs.
//! Prints PASS/FAIL lines; exit code 0 only if all pass.
use ort::ep;
use ort::logging::LogLevel;
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::Session;
use ort::value::{Shape, Tensor, TensorRefMut, TensorValueType};
use std::sync::Arc;
use std::time::Instant;

fn read_f32(path: &std::path::Path) -> Vec<f32> {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn rel_err(a: &[f32], r: &[f32]) -> f64 {
    assert_eq!(a.len(), r.len());
    let mut num = 0f64;
    let mut den = 0f64;
    for (x, y) in a.iter().zip(r) {
        if !x.is_finite() {
            return f64::INFINITY;
        }
        num += (*x as f64 - *y as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    (num / den).sqrt()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let lib = args.get(1).expect("usage: ort_cuda_check LIBONNXRUNTIME MODEL_DIR");
    let dir = std::path::PathBuf::from(args.get(2).expect("usage: ort_cuda_check LIBONNXRUNTIME MODEL_DIR"));
    let ok = std::cell::Cell::new(true);
    let check = |name: &str, err: f64, tol: f64| {
        let pass = err <= tol;
        ok.set(ok.get() & pass);
        println!("{} {name}: rel err {err:.3e} (tol {tol:.0e})", if pass { "PASS" } else { "FAIL" });
    };

    let t = Instant::now();
    let env = ort::init_from(lib)
        .unwrap_or_else(|e| panic!("cannot load '{lib}': {e}"))
        .with_name("ort_cuda_check")
        .with_logger(Arc::new(|level: LogLevel, category: &str, id: &str, loc: &str, msg: &str| {
            let interesting = matches!(level, LogLevel::Warning | LogLevel::Error | LogLevel::Fatal)
                || msg.contains("placement")
                || msg.contains("Node(s) placed")
                || msg.contains("ExecutionProvider")
                || msg.contains("cuDNN")
                || msg.contains("cudnn");
            if interesting {
                let msg: String = msg.chars().take(400).collect();
                eprintln!("[ort {level:?} {category} {id} {loc}] {msg}");
            }
        }))
        .build()
        .expect("environment");
    env.set_log_level(LogLevel::Verbose);
    println!("ORT loaded in {:.3} s: {}", t.elapsed().as_secs_f64(), ort::info());

    let t = Instant::now();
    let cuda_ep = ep::CUDA::default().with_device_id(0).build().error_on_failure();
    let built: Result<Session, String> = (|| {
        let b = Session::builder(&env).map_err(|e| e.to_string())?;
        let b = b.with_execution_providers([cuda_ep]).map_err(|e| e.to_string())?;
        let mut b = b.with_config_entry("session.disable_cpu_ep_fallback", "1").map_err(|e| e.to_string())?;
        b.commit_from_file(dir.join("model.onnx")).map_err(|e| e.to_string())
    })();
    let mut session = match built
    {
        Ok(s) => s,
        Err(e) => {
            println!("FAIL session with CUDA EP (no CPU fallback): {e}");
            std::process::exit(2);
        }
    };
    env.set_log_level(LogLevel::Warning);
    println!("PASS session created with CUDAExecutionProvider, CPU fallback disabled, in {:.3} s", t.elapsed().as_secs_f64());

    let x = read_f32(&dir.join("x.bin"));
    let img = read_f32(&dir.join("img.bin"));
    let y_mm = read_f32(&dir.join("y_mm.bin"));
    let y_conv = read_f32(&dir.join("y_conv.bin"));
    let xt = Tensor::from_array(([64usize, 256], x.clone())).unwrap();
    let it = Tensor::from_array(([1usize, 4, 16, 16], img.clone())).unwrap();

    // 1. host tensors in, host tensors out
    let t = Instant::now();
    {
        let out = session.run(ort::inputs!["X" => xt.view(), "IMG" => it.view()]).expect("run");
        println!("first run (host tensors) {:.3} s", t.elapsed().as_secs_f64());
        let (_, a) = out["Y_MM"].try_extract_tensor::<f32>().unwrap();
        let (_, b) = out["Y_CONV"].try_extract_tensor::<f32>().unwrap();
        // CUDA EP may use TF32 for MatMul/Conv: tolerance 1e-2 (TF32 ~1e-3), fp32 would be ~1e-6.
        check("host run Y_MM (MatMul+Add+LayerNorm)", rel_err(a, &y_mm), 1e-2);
        check("host run Y_CONV (Conv+Relu, cuDNN)", rel_err(b, &y_conv), 1e-2);
    }

    // 2. IoBinding with device memory
    let cuda_info = MemoryInfo::new(AllocationDevice::CUDA, 0, AllocatorType::Device, MemoryType::Default).unwrap();
    let cuda_alloc = Allocator::new(&session, cuda_info.clone()).expect("CUDA allocator");
    let mut x_dev = Tensor::<f32>::new(&cuda_alloc, [64usize, 256]).expect("alloc X on CUDA");
    xt.copy_into(&mut x_dev).expect("copy X to CUDA");
    println!(
        "X on device: {:?}, cpu accessible {}",
        x_dev.memory_info().allocation_device(),
        x_dev.memory_info().is_cpu_accessible()
    );
    // IMG: a raw device pointer (as a cudarc CudaSlice would give), wrapped with from_raw.
    let mut img_backing = Tensor::<f32>::new(&cuda_alloc, [1usize, 4, 16, 16]).expect("alloc IMG on CUDA");
    it.copy_into(&mut img_backing).expect("copy IMG to CUDA");
    let img_ptr = img_backing.data_ptr_mut();
    let img_raw: TensorRefMut<'_, f32> =
        unsafe { TensorRefMut::from_raw(cuda_info.clone(), img_ptr, Shape::new([1i64, 4, 16, 16])) }.expect("from_raw");
    let y_conv_dev = Tensor::<f32>::new(&cuda_alloc, [1usize, 8, 16, 16]).expect("alloc Y_CONV on CUDA");

    let mut binding = session.create_binding().expect("binding");
    binding.bind_input("X", &x_dev).expect("bind X");
    binding.bind_input("IMG", &img_raw).expect("bind IMG (raw device pointer)");
    binding.bind_output_to_device("Y_MM", &cuda_info).expect("bind Y_MM to device");
    binding.bind_output("Y_CONV", y_conv_dev.clone()).expect("bind Y_CONV to CUDA tensor");
    let t = Instant::now();
    {
        let mut out = session.run_binding(&binding).expect("run_binding");
        binding.synchronize_outputs().expect("sync");
        println!("first IoBinding run {:.3} s", t.elapsed().as_secs_f64());
        let a = out.remove("Y_MM").unwrap().downcast::<TensorValueType<f32>>().expect("Y_MM f32");
        let dev = a.memory_info().allocation_device();
        println!("Y_MM output on {:?}, cpu accessible {}", dev, a.memory_info().is_cpu_accessible());
        let ok_dev = dev == AllocationDevice::CUDA;
        ok.set(ok.get() & ok_dev);
        println!("{} Y_MM output lives in CUDA memory", if ok_dev { "PASS" } else { "FAIL" });
        let a_host = a.to(AllocationDevice::CPU, 0).expect("Y_MM to host");
        check("IoBinding Y_MM (device in, bind_output_to_device)", rel_err(a_host.extract_tensor().1, &y_mm), 1e-2);
        let b_host = y_conv_dev.to(AllocationDevice::CPU, 0).expect("Y_CONV to host");
        check("IoBinding Y_CONV (raw device ptr in, preallocated CUDA out)", rel_err(b_host.extract_tensor().1, &y_conv), 1e-2);
    }

    // 3. timing of repeated device-resident runs
    let mut times = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        let _out = session.run_binding(&binding).expect("run_binding");
        binding.synchronize_outputs().expect("sync");
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!("IoBinding run (device buffers), 200 runs: median {:.1} us, min {:.1} us, max {:.1} us", times[100], times[0], times[199]);

    println!("{}", if ok.get() { "ALL PASS" } else { "SOME FAILED" });
    std::process::exit(if ok.get() { 0 } else { 1 });
}
