//! A stable-Rust mutation fuzzer for trt-diff's readers (cargo-fuzz needs a nightly compiler, which cannot be
//! fetched here). Each target (see `targets.rs`) is fed mutants of its seed corpus: bit flips, interesting
//! integers (0, -1, 2^31, 2^63, ...) written at random offsets in both byte orders, inserted, deleted, duplicated
//! and spliced ranges, truncation. There is no coverage instrumentation; as a cheap substitute, a mutant whose
//! outcome (Ok, or the wording of its error) is new joins the corpus. A panic is caught and its input saved
//! under `fuzz/artifacts/TARGET/`; an allocation above 4 GiB (what a header read unchecked asks for) saves the
//! input as `oom-*` and aborts.
//!
//!   fuzz run TARGET [--secs N] [--execs N] [--seed N]
//!   fuzz replay TARGET FILE...        (exit status 1 if any input panics)
//!   fuzz seeds                        (re-create fuzz/corpus/*/seed-*)
//!   fuzz list
mod seeds;
mod targets;

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Largest single allocation a target may make; above it the input is a finding.
const ALLOC_LIMIT: usize = 4 << 30;

static CURRENT_PTR: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
static CURRENT_LEN: AtomicUsize = AtomicUsize::new(0);
/// NUL-terminated path where the current input is dumped when an allocation is too large.
static OOM_PATH: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());

struct Guarded;

unsafe impl GlobalAlloc for Guarded {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ALLOC_LIMIT {
            oom(layout.size());
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ALLOC_LIMIT {
            oom(layout.size());
        }
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > ALLOC_LIMIT {
            oom(new_size);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Guarded = Guarded;

/// Writes the current input to OOM_PATH with raw syscalls (no allocation) and aborts.
fn oom(size: usize) -> ! {
    let path = OOM_PATH.load(Ordering::SeqCst);
    let (ptr, len) = (
        CURRENT_PTR.load(Ordering::SeqCst),
        CURRENT_LEN.load(Ordering::SeqCst),
    );
    // SAFETY: path is a leaked NUL-terminated buffer; ptr/len describe the live input buffer of the fuzz loop.
    unsafe {
        if !path.is_null() && !ptr.is_null() {
            let fd = libc::open(
                path as *const libc::c_char,
                libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
                0o644,
            );
            if fd >= 0 {
                libc::write(fd, ptr as *const libc::c_void, len);
                libc::close(fd);
            }
        }
        let msg = b"fuzz: allocation above the limit; input saved as oom-current\n";
        libc::write(2, msg.as_ptr() as *const libc::c_void, msg.len());
        let _ = size;
        libc::abort();
    }
}

fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// xorshift64*: fast and reproducible from `--seed`.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    7,
    8,
    16,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x7fff,
    0x8000,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    1 << 40,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX,
    u64::MAX - 1,
];

const TOKENS: &[&[u8]] = &[
    b"{{",
    b"}}",
    b"{%",
    b"%}",
    b"for ",
    b"endfor",
    b" in ",
    b"if ",
    b"endif",
    b"range(",
    b"*",
    b"~",
    b"|",
    b"..",
    b"/",
    b"\"location\"",
    b"\"offset\"",
    b"\"length\"",
    b"<s>",
    b"</s>",
    b"<|im_start|>",
    b"\xe2\x80",
    b"\xf0\x9f\x98\x80",
    b"\\u0000",
    b"-1",
    b"1e308",
    b"[",
    b"]",
    b"{",
    b"}",
    b",",
    b":",
    b"\"",
];

fn mutate(rng: &mut Rng, input: &mut Vec<u8>, corpus: &[Vec<u8>]) {
    let rounds = 1 + rng.below(6);
    for _ in 0..rounds {
        let len = input.len();
        match rng.below(11) {
            0 if len > 0 => {
                let i = rng.below(len);
                input[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                input[i] = rng.next() as u8;
            }
            2 | 3 if len > 0 => {
                // An interesting integer, 1/2/4/8 bytes, either byte order.
                let v = INTERESTING[rng.below(INTERESTING.len())];
                let v = if rng.below(4) == 0 {
                    v.wrapping_neg()
                } else {
                    v
                };
                let w = [1usize, 2, 4, 8][rng.below(4)];
                let bytes = if rng.below(4) == 0 {
                    v.to_be_bytes()[8 - w..].to_vec()
                } else {
                    v.to_le_bytes()[..w].to_vec()
                };
                let i = rng.below(len);
                for (k, b) in bytes.iter().enumerate() {
                    if i + k < len {
                        input[i + k] = *b;
                    }
                }
            }
            4 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let fill: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                input.splice(i..i, fill);
            }
            5 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                input.drain(i..i + n);
            }
            6 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(256));
                let chunk = input[i..i + n].to_vec();
                let at = rng.below(len + 1);
                input.splice(at..at, chunk);
            }
            7 if !corpus.is_empty() => {
                let other = &corpus[rng.below(corpus.len())];
                if !other.is_empty() {
                    let i = rng.below(other.len());
                    let n = 1 + rng.below((other.len() - i).min(512));
                    let at = rng.below(len + 1);
                    let end = (at + n).min(len);
                    input.splice(at..end, other[i..i + n].iter().copied());
                }
            }
            8 if len > 0 => {
                input.truncate(rng.below(len));
            }
            9 => {
                let t = TOKENS[rng.below(TOKENS.len())];
                let at = rng.below(len + 1);
                input.splice(at..at, t.iter().copied());
            }
            _ if len > 1 => {
                // Copy a range over another (length fields often equal other fields).
                let a = rng.below(len);
                let b = rng.below(len);
                let n = 1 + rng.below((len - a.max(b)).min(8));
                let chunk = input[a..a + n].to_vec();
                input[b..b + n].copy_from_slice(&chunk);
            }
            _ => {}
        }
        if input.len() > 1 << 20 {
            input.truncate(1 << 20);
        }
    }
}

fn load_dir(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        // Files, and links to them (seeds that are committed goldens elsewhere in the repository).
        .filter(|e| std::fs::metadata(e.path()).is_ok_and(|m| m.is_file()))
        .filter_map(|e| std::fs::read(e.path()).ok().map(|b| (e.path(), b)))
        .collect();
    v.sort();
    v
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "non-string panic".into())
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

fn run_target(target: &str, secs: u64, max_execs: u64, seed: u64) -> i32 {
    let corpus_dir = fuzz_dir().join("corpus").join(target);
    let art = fuzz_dir().join("artifacts").join(target);
    std::fs::create_dir_all(&art).ok();
    let oom_path = format!("{}\0", art.join("oom-current").display());
    OOM_PATH.store(
        Box::leak(oom_path.into_bytes().into_boxed_slice()).as_mut_ptr(),
        Ordering::SeqCst,
    );
    let mut corpus: Vec<Vec<u8>> = load_dir(&corpus_dir).into_iter().map(|(_, b)| b).collect();
    if corpus.is_empty() {
        corpus.push(Vec::new());
    }
    let seeds = corpus.len();
    let scratch = targets::Scratch::new();
    let mut rng = Rng(seed.max(1));
    let mut seen = std::collections::HashSet::new();
    let (mut execs, mut crashes, mut slow) = (0u64, 0u64, 0u64);
    let mut crash_kinds = std::collections::HashSet::new();
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let mut last_report = Instant::now();
    std::panic::set_hook(Box::new(|_| {}));
    // Seeds first, unmutated.
    let mut queue: Vec<Vec<u8>> = corpus.clone();
    while Instant::now() < deadline && execs < max_execs {
        let input = match queue.pop() {
            Some(i) => i,
            None => {
                let mut i = corpus[rng.below(corpus.len())].clone();
                mutate(&mut rng, &mut i, &corpus);
                i
            }
        };
        CURRENT_PTR.store(input.as_ptr() as *mut u8, Ordering::SeqCst);
        CURRENT_LEN.store(input.len(), Ordering::SeqCst);
        let t0 = Instant::now();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            targets::run(target, &scratch, &input)
        }));
        let took = t0.elapsed();
        execs += 1;
        match r {
            Ok(Some(sig)) => {
                if seen.insert(sig) && corpus.len() < 4096 {
                    corpus.push(input.clone());
                }
            }
            Ok(None) => {
                eprintln!(
                    "unknown target '{target}'; targets: {}",
                    targets::TARGETS.join(", ")
                );
                return 2;
            }
            Err(p) => {
                let msg = panic_message(&*p);
                crashes += 1;
                let kind: String = msg
                    .chars()
                    .filter(|c| !c.is_ascii_digit())
                    .take(80)
                    .collect();
                if crash_kinds.insert(kind) {
                    let f = art.join(format!("crash-{:016x}", fnv(&input)));
                    std::fs::write(&f, &input).ok();
                    eprintln!("{target}: PANIC \"{msg}\" -> {}", f.display());
                }
            }
        }
        // The first input also pays for loading the target's fixtures (vocabularies): not counted as slow.
        if took > Duration::from_secs(2) && execs > 1 {
            slow += 1;
            let f = art.join(format!("slow-{:016x}", fnv(&input)));
            if slow <= 5 {
                std::fs::write(&f, &input).ok();
                eprintln!(
                    "{target}: slow input ({:.1}s) -> {}",
                    took.as_secs_f64(),
                    f.display()
                );
            }
        }
        if last_report.elapsed() > Duration::from_secs(30) {
            last_report = Instant::now();
            eprintln!(
                "{target}: {execs} execs ({:.0}/s), corpus {} ({seeds} seeds), {crashes} panics",
                execs as f64 / start.elapsed().as_secs_f64(),
                corpus.len()
            );
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{target}: {execs} execs in {secs:.0}s ({:.0}/s), {seeds} seeds, corpus grew to {}, {} distinct outcomes, {crashes} panics ({} distinct), {slow} slow (>2s)",
        execs as f64 / secs,
        corpus.len(),
        seen.len(),
        crash_kinds.len()
    );
    if crashes > 0 { 1 } else { 0 }
}

fn replay(target: &str, files: &[String]) -> i32 {
    let scratch = targets::Scratch::new();
    let mut bad = 0;
    for f in files {
        let Ok(data) = std::fs::read(f) else {
            eprintln!("cannot read {f}");
            bad += 1;
            continue;
        };
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            targets::run(target, &scratch, &data)
        })) {
            Ok(sig) => println!("{f}: {}", sig.unwrap_or_else(|| "unknown target".into())),
            Err(p) => {
                println!("{f}: PANIC {}", panic_message(&*p));
                bad += 1;
            }
        }
    }
    if bad > 0 { 1 } else { 0 }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str, default: u64| -> u64 {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let code = match args.first().map(String::as_str) {
        Some("run") if args.len() >= 2 => run_target(
            &args[1],
            flag("--secs", 60),
            flag("--execs", u64::MAX),
            flag("--seed", 0x5eed),
        ),
        Some("replay") if args.len() >= 2 => replay(&args[1], &args[2..]),
        Some("seeds") => match seeds::write_all(&fuzz_dir().join("corpus")) {
            Ok(n) => {
                println!("wrote {n} seed files");
                0
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                1
            }
        },
        Some("list") => {
            println!("{}", targets::TARGETS.join("\n"));
            0
        }
        _ => {
            eprintln!(
                "usage: fuzz run TARGET [--secs N] [--execs N] [--seed N] | replay TARGET FILE... | seeds | list"
            );
            2
        }
    };
    std::process::exit(code);
}
