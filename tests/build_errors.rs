//! Bad input: each case exits non-zero with a message naming the file, the cause and the fix, never panics, and
//! leaves no partial output behind.
use crate::common;
use common::*;
use trt_diff::models::mlp::MlpConfig;
use trt_diff::onnx::{DataType, GraphBuilder, SaveOptions, save};

fn mlp(dir: &std::path::Path) -> std::path::PathBuf {
    write_model(dir, "m.onnx", &MlpConfig::default())
}

/// Runs a failing command and checks the message mentions every needle and nothing was written.
fn fails(dir: &std::path::Path, args: &[&str], needles: &[&str]) -> String {
    fails_env(dir, args, &[], needles)
}

fn fails_env(
    dir: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
    needles: &[&str],
) -> String {
    let r = run_env(args, env, false);
    assert_eq!(r.code, 1);
    for n in needles {
        assert!(r.stderr.contains(n), "missing '{n}' in:\n{}", r.stderr);
    }
    assert!(
        outputs_in(dir).is_empty(),
        "left behind: {:?}",
        outputs_in(dir)
    );
    r.stderr
}

#[test]
fn missing_file() {
    let d = tempfile::tempdir().unwrap();
    let missing = d.path().join("nope.onnx");
    let out = d.path().join("x.plan");
    fails(
        d.path(),
        &["build", s(&missing), "--out", s(&out)],
        &["nope.onnx", "no such file", "check the path"],
    );
    fails(
        d.path(),
        &["inspect", s(&missing)],
        &["nope.onnx", "check the path"],
    );
    fails(
        d.path(),
        &["inspect", s(&d.path().join("nope.plan"))],
        &["nope.plan", "check the path"],
    );
}

#[test]
fn truncated_onnx() {
    let d = tempfile::tempdir().unwrap();
    let onnx = mlp(d.path());
    let bytes = std::fs::read(&onnx).unwrap();
    let cut = d.path().join("cut.onnx");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let out = d.path().join("cut.plan");
    fails(
        d.path(),
        &["build", s(&cut), "--out", s(&out)],
        &["cut.onnx", "truncated or corrupt", "re-export"],
    );
    fails(
        d.path(),
        &["inspect", s(&cut)],
        &["cut.onnx", "truncated or corrupt"],
    );
    // Truncated external data is caught before TensorRT reads past the end.
    let data = d.path().join("m.onnx.data");
    let full = std::fs::read(&data).unwrap();
    std::fs::write(&data, &full[..full.len() - 100]).unwrap();
    fails(
        d.path(),
        &["build", s(&onnx), "--out", s(&out)],
        &["m.onnx.data", "truncated"],
    );
    std::fs::remove_file(&data).unwrap();
    fails(
        d.path(),
        &["build", s(&onnx), "--out", s(&out)],
        &["m.onnx.data", "cannot be opened"],
    );
}

#[test]
fn garbage_onnx() {
    let d = tempfile::tempdir().unwrap();
    let g = d.path().join("g.onnx");
    std::fs::write(&g, b"\xff\xfe this is not protobuf at all \x00\x01").unwrap();
    fails(
        d.path(),
        &["inspect", s(&g)],
        &["g.onnx", "not a valid ONNX model"],
    );
    std::fs::write(&g, b"").unwrap();
    fails(
        d.path(),
        &["build", s(&g), "--out", s(&d.path().join("g.plan"))],
        &["g.onnx", "empty"],
    );
}

#[test]
fn op_tensorrt_rejects_names_the_node() {
    let d = tempfile::tempdir().unwrap();
    let mut g = GraphBuilder::new("bad", 17);
    let x = g.input("x", DataType::FLOAT, trt_diff::shape![8]).unwrap();
    let h = g
        .op(
            "Relu",
            "ok_relu",
            &[&x],
            vec![],
            DataType::FLOAT,
            trt_diff::shape![8],
        )
        .unwrap();
    let y = g
        .op(
            "NoSuchOperator",
            "the_bad_node",
            &[&h],
            vec![],
            DataType::FLOAT,
            trt_diff::shape![8],
        )
        .unwrap();
    g.output(&y);
    let path = d.path().join("bad.onnx");
    save(g.finish(), &path, &SaveOptions::default()).unwrap();
    let out = d.path().join("bad.plan");
    fails(
        d.path(),
        &["build", s(&path), "--out", s(&out)],
        &[
            "bad.onnx",
            "node 1 'the_bad_node' (op NoSuchOperator)",
            "Fix:",
        ],
    );
}

fn inspect_fails(path: &std::path::Path, needles: &[&str]) {
    let r = run(&["inspect", s(path)], false);
    for n in needles {
        assert!(r.stderr.contains(n), "missing '{n}' in:\n{}", r.stderr);
    }
}

#[test]
fn garbage_and_truncated_plans() {
    let d = tempfile::tempdir().unwrap();
    let junk = d.path().join("junk.plan");
    std::fs::write(&junk, vec![7u8; 4096]).unwrap();
    inspect_fails(&junk, &["junk.plan", "not a TensorRT plan", "rebuild"]);
    let unknown = d.path().join("junk.bin");
    std::fs::write(&unknown, vec![7u8; 64]).unwrap();
    inspect_fails(&unknown, &["junk.bin", "unknown file kind"]);

    let onnx = mlp(d.path());
    let plan = d.path().join("m.plan");
    run(
        &["build", s(&onnx), "--out", s(&plan), "--no-progress"],
        true,
    );
    let bytes = std::fs::read(&plan).unwrap();
    // Truncated, with its manifest beside it.
    std::fs::write(&plan, &bytes[..bytes.len() - 1000]).unwrap();
    inspect_fails(&plan, &["m.plan", "truncated", "rebuild"]);
    // Truncated, without a manifest: the plan's own header records its size.
    let lone = d.path().join("lone.plan");
    std::fs::write(&lone, &bytes[..bytes.len() / 3]).unwrap();
    inspect_fails(&lone, &["lone.plan", "truncated"]);
    // Same size, one byte changed: the manifest's checksum catches it.
    let mut flipped = bytes.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0xff;
    std::fs::write(&plan, &flipped).unwrap();
    inspect_fails(&plan, &["m.plan", "checksum", "corrupt"]);
    // A damaged manifest is named too.
    std::fs::write(&plan, &bytes).unwrap();
    std::fs::write(d.path().join("m.plan.json"), b"{ not json").unwrap();
    inspect_fails(&plan, &["m.plan.json", "not a trt-diff manifest"]);
    // The intact plan without a manifest is still recognised.
    std::fs::remove_file(d.path().join("m.plan.json")).unwrap();
    let r = run(&["inspect", s(&plan)], true);
    assert!(r.stdout.contains("no manifest"), "{}", r.stdout);
}

#[test]
fn no_tensorrt_library() {
    let d = tempfile::tempdir().unwrap();
    let onnx = mlp(d.path());
    let out = d.path().join("m.plan");
    let empty = d.path().join("empty-cache");
    let env = [
        ("TRT_DIFF_CACHE", s(&empty)),
        ("LD_LIBRARY_PATH", ""),
        ("TRT_LIB_DIR", s(&empty)),
    ];
    let err = fails_env(
        d.path(),
        &["build", s(&onnx), "--out", s(&out), "--trt", "rtx"],
        &env,
        &[
            "libtensorrt_rtx.so.1",
            "Searched:",
            "empty-cache/lib (set-up cache)",
            "(TRT_LIB_DIR)",
            "scripts/setup.sh",
        ],
    );
    assert!(
        err.contains("/usr/lib/x86_64-linux-gnu (standard location)")
            || cfg!(not(target_arch = "x86_64"))
    );
    fails_env(
        d.path(),
        &["build", s(&onnx), "--out", s(&out), "--trt", "trt11"],
        &env,
        &["libnvinfer.so.11", "TensorRT 11", "--trt-lib-dir"],
    );
    // auto lists both flavours.
    fails_env(
        d.path(),
        &["build", s(&onnx), "--out", s(&out)],
        &env,
        &["libtensorrt_rtx.so.1", "libnvinfer.so.11"],
    );
    // A folder given explicitly is searched first and named.
    let r = run_env(
        &[
            "build",
            s(&onnx),
            "--out",
            s(&out),
            "--trt-lib-dir",
            "/no/such/dir",
        ],
        &env,
        false,
    );
    assert!(
        r.stderr.contains("/no/such/dir (--trt-lib-dir)"),
        "{}",
        r.stderr
    );
    // doctor still runs and says what is missing.
    let r = run_env(&["doctor"], &env, true);
    assert!(r.stdout.contains("not found"), "{}", r.stdout);
}

#[test]
fn contradictory_options() {
    let d = tempfile::tempdir().unwrap();
    let onnx = mlp(d.path());
    let out = d.path().join("m.plan");
    let b = |extra: &[&str], needles: &[&str]| {
        let mut a = vec!["build", s(&onnx), "--out", s(&out)];
        a.extend_from_slice(extra);
        fails(d.path(), &a, needles);
    };
    b(
        &["--trt", "trt11", "--targets", "sm120"],
        &["--targets", "--trt trt11"],
    );
    b(&["--targets", "sm90"], &["sm90", "choose from"]);
    b(&["--opt-level", "9"], &["--opt-level 9", "0..=5"]);
    b(&["--workspace", "0"], &["--workspace 0"]);
    b(&["--shapes", "x=4x64:2x64:1x64"], &["MIN <= OPT <= MAX"]);
    b(&["--shapes", "nope=1x2"], &["'nope'", "inputs: x"]);
    b(&["--shapes", "x=4x65"], &["fixed to 64"]);
    b(&["--shapes", "x=4"], &["1 dimensions given", "has 2"]);
    fails(
        d.path(),
        &["build", s(&onnx), "--out", s(&onnx)],
        &["ends in .onnx"],
    );
    let data = d.path().join("m.onnx.data");
    let before = std::fs::read(&data).unwrap();
    fails(
        d.path(),
        &["build", s(&onnx), "--out", s(&data)],
        &["external data file"],
    );
    assert_eq!(std::fs::read(&data).unwrap(), before);
    // FP4 compute cannot target pre-Blackwell GPUs: caught before TensorRT runs.
    let cfg = MlpConfig {
        precision: trt_diff::quant::LinearPrecision::Nvfp4,
        ..Default::default()
    };
    let fp4 = write_model(d.path(), "fp4.onnx", &cfg);
    fails(
        d.path(),
        &[
            "build",
            s(&fp4),
            "--out",
            s(&out),
            "--targets",
            "sm86,sm120",
        ],
        &["fp4.onnx", "FP4", "sm86", "drop them from --targets"],
    );
    // Not an ONNX file at all.
    let txt = d.path().join("notes.txt");
    std::fs::write(&txt, "hello").unwrap();
    fails(
        d.path(),
        &["build", s(&txt), "--out", s(&out)],
        &["notes.txt", "not an .onnx file"],
    );
}
