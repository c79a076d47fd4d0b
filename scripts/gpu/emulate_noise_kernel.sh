#!/usr/bin/env bash
# Checks without a GPU that the CUDA noise kernel's source (philox_normal_f32 in src/cuda/kernels.cu) transcribes
# the host generator (src/samplers/gauss.rs): the kernel's section is compiled as host C++ with each CUDA
# intrinsic replaced by its IEEE definition (__fmaf_rn -> fmaf, __fmul_rn/__fadd_rn -> one rounded operation, no
# contraction) and run over the same seeds/streams/lengths as examples/gpu_check.rs; the outputs must equal the
# Rust host's bit for bit. The real device check stays examples/gpu_check.rs on a GPU. Needs g++ and rustc.
#     bash scripts/gpu/emulate_noise_kernel.sh
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 - "$root/src/cuda/kernels.cu" "$tmp/emu.cpp" <<'EOF'
import sys
src = open(sys.argv[1]).read()
body = src[src.index("// Philox4x32-10 (Random123)"):src.index("// Casts, round to nearest even")]
prelude = r'''#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
typedef unsigned long long u64; typedef unsigned int u32;
struct uint4 { u32 x, y, z, w; }; struct uint2 { u32 x, y; };
static uint4 make_uint4(u32 a, u32 b, u32 c, u32 d) { return {a, b, c, d}; }
static uint2 make_uint2(u32 a, u32 b) { return {a, b}; }
static u32 __umulhi(u32 a, u32 b) { return (u32)(((u64)a * b) >> 32); }
static float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
static float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
static float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
static float __fsub_rn(float a, float b) { volatile float r = a - b; return r; }
static float __fsqrt_rn(float a) { return sqrtf(a); }
static float __int2float_rn(int a) { return (float)a; }
static float __uint2float_rn(u32 a) { return (float)a; }
static u32 __float_as_uint(float f) { u32 u; memcpy(&u, &f, 4); return u; }
static float __uint_as_float(u32 u) { float f; memcpy(&f, &u, 4); return f; }
#define __device__
#define __forceinline__ inline
#define __global__
#define __restrict__
struct Dim { u64 x; }; static Dim blockIdx{0}, blockDim{1}, threadIdx{0}, gridDim{1};
'''
main = r'''
int main(int argc, char** argv) {
  u64 n = strtoull(argv[1], 0, 10), seed = strtoull(argv[2], 0, 10), stream = strtoull(argv[3], 0, 10);
  float* out = new float[n];
  philox_normal_f32(out, n, seed, stream);
  fwrite(out, 4, n, stdout);
  return 0;
}
'''
open(sys.argv[2], "w").write(prelude + body + main)
EOF
g++ -O2 -ffp-contract=off -o "$tmp/emu" "$tmp/emu.cpp"
cat > "$tmp/host.rs" <<EOF
#[allow(dead_code)]
#[path = "$root/src/samplers/gauss.rs"]
mod gauss;
use std::io::Read;
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let (n, seed, stream): (usize, u64, u64) = (a[1].parse().unwrap(), a[2].parse().unwrap(), a[3].parse().unwrap());
    let mut host = vec![0f32; n];
    gauss::fill(&mut host, [seed as u32, (seed >> 32) as u32], stream, 0, |z| z);
    let mut buf = Vec::new();
    std::io::stdin().read_to_end(&mut buf).unwrap();
    let dev: Vec<f32> = buf.chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let bad = host.iter().zip(&dev).filter(|(x, y)| x.to_bits() != y.to_bits()).count() + n.abs_diff(dev.len());
    println!("seed={seed} stream={stream}: {bad} of {n} elements differ");
    std::process::exit(if bad == 0 { 0 } else { 1 });
}
EOF
rustc --edition 2021 -O -o "$tmp/host" "$tmp/host.rs"
for args in "16777219 0 0" "16777219 42 7" "16777219 244837814047284 8589934592"; do
  "$tmp/emu" $args | "$tmp/host" $args
done
