// Kernels the pipelines run between engine calls. Compiled at run time by NVRTC (once per process).
// Arithmetic uses explicit round-to-nearest intrinsics (__fmul_rn/__fadd_rn, no FMA contraction) in the same order
// as the host implementations, so device and host results are bit-identical.

typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;

// out = beta * out + sum_j c[j] * x[j], j < k <= 8; with beta == 0 the old contents are not read.
extern "C" __global__ void lincomb_f32(float* __restrict__ out, u64 n, float beta, int k,
    const float* __restrict__ x0, const float* __restrict__ x1, const float* __restrict__ x2,
    const float* __restrict__ x3, const float* __restrict__ x4, const float* __restrict__ x5,
    const float* __restrict__ x6, const float* __restrict__ x7,
    float c0, float c1, float c2, float c3, float c4, float c5, float c6, float c7) {
  const float* xs[8] = {x0, x1, x2, x3, x4, x5, x6, x7};
  const float cs[8] = {c0, c1, c2, c3, c4, c5, c6, c7};
  u64 stride = (u64)gridDim.x * blockDim.x;
  for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    float acc;
    int j = 0;
    if (beta != 0.0f) {
      acc = __fmul_rn(beta, out[i]);
    } else if (k > 0) {
      acc = __fmul_rn(cs[0], xs[0][i]);
      j = 1;
    } else {
      acc = 0.0f;
    }
    #pragma unroll
    for (int t = 0; t < 8; ++t) {
      if (t >= j && t < k) acc = __fadd_rn(acc, __fmul_rn(cs[t], xs[t][i]));
    }
    out[i] = acc;
  }
}

// The same with float4 loads and stores (all pointers 16-byte aligned): more bytes in flight per thread, which
// single-input combinations need to reach copy bandwidth. Element i is computed exactly as in lincomb_f32.
__device__ __forceinline__ float lc1(float acc, float c, float x) { return __fadd_rn(acc, __fmul_rn(c, x)); }
extern "C" __global__ void lincomb4_f32(float* __restrict__ out, u64 n, float beta, int k,
    const float* __restrict__ x0, const float* __restrict__ x1, const float* __restrict__ x2,
    const float* __restrict__ x3, const float* __restrict__ x4, const float* __restrict__ x5,
    const float* __restrict__ x6, const float* __restrict__ x7,
    float c0, float c1, float c2, float c3, float c4, float c5, float c6, float c7) {
  const float* xs[8] = {x0, x1, x2, x3, x4, x5, x6, x7};
  const float cs[8] = {c0, c1, c2, c3, c4, c5, c6, c7};
  u64 n4 = n / 4;
  u64 stride = (u64)gridDim.x * blockDim.x;
  u64 tid = (u64)blockIdx.x * blockDim.x + threadIdx.x;
  for (u64 i = tid; i < n4; i += stride) {
    float4 acc;
    int j = 0;
    if (beta != 0.0f) {
      float4 o = reinterpret_cast<const float4*>(out)[i];
      acc = make_float4(__fmul_rn(beta, o.x), __fmul_rn(beta, o.y), __fmul_rn(beta, o.z), __fmul_rn(beta, o.w));
    } else if (k > 0) {
      float4 x = reinterpret_cast<const float4*>(xs[0])[i];
      acc = make_float4(__fmul_rn(cs[0], x.x), __fmul_rn(cs[0], x.y), __fmul_rn(cs[0], x.z), __fmul_rn(cs[0], x.w));
      j = 1;
    } else {
      acc = make_float4(0.f, 0.f, 0.f, 0.f);
    }
    #pragma unroll
    for (int t = 0; t < 8; ++t) {
      if (t >= j && t < k) {
        float4 x = reinterpret_cast<const float4*>(xs[t])[i];
        acc = make_float4(lc1(acc.x, cs[t], x.x), lc1(acc.y, cs[t], x.y), lc1(acc.z, cs[t], x.z), lc1(acc.w, cs[t], x.w));
      }
    }
    reinterpret_cast<float4*>(out)[i] = acc;
  }
  // The last n % 4 elements, scalar.
  for (u64 i = n4 * 4 + tid; i < n; i += stride) {
    float acc;
    int j = 0;
    if (beta != 0.0f) {
      acc = __fmul_rn(beta, out[i]);
    } else if (k > 0) {
      acc = __fmul_rn(cs[0], xs[0][i]);
      j = 1;
    } else {
      acc = 0.0f;
    }
    #pragma unroll
    for (int t = 0; t < 8; ++t) {
      if (t >= j && t < k) acc = lc1(acc, cs[t], xs[t][i]);
    }
    out[i] = acc;
  }
}

// Classifier-free guidance: out = uncond + scale * (cond - uncond).
extern "C" __global__ void cfg_f32(float* __restrict__ out, const float* __restrict__ uncond,
                                   const float* __restrict__ cond, float scale, u64 n) {
  u64 stride = (u64)gridDim.x * blockDim.x;
  for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    float u = uncond[i];
    out[i] = __fadd_rn(u, __fmul_rn(scale, __fsub_rn(cond[i], u)));
  }
}

// Philox4x32-10 (Random123), same constants and round structure as src/samplers/noise.rs.
__device__ __forceinline__ uint4 philox(uint4 c, uint2 k) {
  const u32 M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
  #pragma unroll
  for (int r = 0; r < 10; ++r) {
    if (r > 0) { k.x += W0; k.y += W1; }
    u32 hi0 = __umulhi(M0, c.x), lo0 = M0 * c.x;
    u32 hi1 = __umulhi(M1, c.z), lo1 = M1 * c.z;
    c = make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
  }
  return c;
}

// Box-Muller in f32 with our own log and sin/cos: the operation sequence of src/samplers/gauss.rs, every
// rounding explicit (__fmaf_rn = one rounding, __fmul_rn/__fadd_rn, __fsqrt_rn), constants by their bit patterns,
// so the result is bit-identical with the host.
__device__ __forceinline__ float bm_ln_unit(float u) {
  const u32 SQRT_HALF_BITS = 0x3f3504f3u;
  u32 ix = __float_as_uint(u) - SQRT_HALF_BITS;
  int k = ((int)ix) >> 23;
  float m = __uint_as_float((ix & 0x007fffffu) + SQRT_HALF_BITS);
  float f = __fsub_rn(m, 1.0f);
  float kf = __int2float_rn(k);
  float z = __fmul_rn(f, f);
  float p = __uint_as_float(0xbd9c5a3bu);
  p = __fmaf_rn(p, f, __uint_as_float(0x3e02ad5eu));
  p = __fmaf_rn(p, f, __uint_as_float(0xbe06c291u));
  p = __fmaf_rn(p, f, __uint_as_float(0x3e116d1au));
  p = __fmaf_rn(p, f, __uint_as_float(0xbe2a3925u));
  p = __fmaf_rn(p, f, __uint_as_float(0x3e4cd004u));
  p = __fmaf_rn(p, f, __uint_as_float(0xbe800113u));
  p = __fmaf_rn(p, f, __uint_as_float(0x3eaaaaaau));
  float y = __fmaf_rn(__fmul_rn(z, f), p, __fmul_rn(kf, __uint_as_float(0xb95e8083u)));
  y = __fmaf_rn(-0.5f, z, y);
  return __fmaf_rn(kf, __uint_as_float(0x3f318000u), __fadd_rn(f, y));
}

// (sin, cos) of 2 pi b / 2^32.
__device__ __forceinline__ void bm_sincos_turns(u32 b, float* sn, float* cs) {
  const float TWO_M32 = __uint_as_float(0x2f800000u);
  u32 b1 = b + (1u << 29);
  u32 q = b1 >> 30;
  int j = (int)(b1 & 0x3fffffffu) - (1 << 29);
  float x = __fmul_rn(__int2float_rn(j), TWO_M32);
  float x2 = __fmul_rn(x, x);
  float p = __fmaf_rn(__uint_as_float(0xc296e43cu), x2, __uint_as_float(0x42a33003u));
  p = __fmaf_rn(p, x2, __uint_as_float(0xc2255ddfu));
  float s = __fmaf_rn(x, __uint_as_float(0x40c90fdbu), __fmul_rn(x, __fmaf_rn(x2, p, __uint_as_float(0xb43bbd2eu))));
  float cp = __fmaf_rn(__uint_as_float(0x426cead1u), x2, __uint_as_float(0xc2aae2f0u));
  cp = __fmaf_rn(cp, x2, __uint_as_float(0x4281e0efu));
  cp = __fmaf_rn(cp, x2, __uint_as_float(0xc19de9e6u));
  float c = __fmaf_rn(x2, cp, 1.0f);
  float s1 = (q & 1u) ? c : s;
  float c1 = (q & 1u) ? s : c;
  *sn = __uint_as_float(__float_as_uint(s1) ^ ((q >> 1) << 31));
  *cs = __uint_as_float(__float_as_uint(c1) ^ (((q ^ (q >> 1)) & 1u) << 31));
}

__device__ __forceinline__ void box_muller(u32 a, u32 b, float* z0, float* z1) {
  const float TWO_M32 = __uint_as_float(0x2f800000u);
  float u1 = __fmaf_rn(__uint2float_rn(a), TWO_M32, TWO_M32);
  float r = __fsqrt_rn(__fmul_rn(-2.0f, bm_ln_unit(u1)));
  float s, c;
  bm_sincos_turns(b, &s, &c);
  *z0 = __fmul_rn(r, c);
  *z1 = __fmul_rn(r, s);
}

// Standard normals: element e takes block q = e / 4, counter (q, stream), key = seed (see noise.rs).
extern "C" __global__ void philox_normal_f32(float* __restrict__ out, u64 n, u64 seed, u64 stream_id) {
  u64 blocks = (n + 3) / 4;
  u64 stride = (u64)gridDim.x * blockDim.x;
  uint2 key = make_uint2((u32)seed, (u32)(seed >> 32));
  for (u64 q = (u64)blockIdx.x * blockDim.x + threadIdx.x; q < blocks; q += stride) {
    uint4 w = philox(make_uint4((u32)q, (u32)(q >> 32), (u32)stream_id, (u32)(stream_id >> 32)), key);
    float z[4];
    box_muller(w.x, w.y, &z[0], &z[1]);
    box_muller(w.z, w.w, &z[2], &z[3]);
    #pragma unroll
    for (int t = 0; t < 4; ++t) {
      u64 e = q * 4 + t;
      if (e < n) out[e] = z[t];
    }
  }
}

// Casts, round to nearest even (PTX cvt.rn).
extern "C" __global__ void f32_to_f16(u16* __restrict__ out, const float* __restrict__ in, u64 n) {
  u64 stride = (u64)gridDim.x * blockDim.x;
  for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(in[i]));
    out[i] = h;
  }
}
extern "C" __global__ void f16_to_f32(float* __restrict__ out, const u16* __restrict__ in, u64 n) {
  u64 stride = (u64)gridDim.x * blockDim.x;
  for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(in[i]));
    out[i] = f;
  }
}
extern "C" __global__ void f32_to_bf16(u16* __restrict__ out, const float* __restrict__ in, u64 n) {
  u64 stride = (u64)gridDim.x * blockDim.x;
  for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(in[i]));
    out[i] = h;
  }
}
extern "C" __global__ void bf16_to_f32(float* __restrict__ out, const u16* __restrict__ in, u64 n) {
  u64 stride = (u64)gridDim.x * blockDim.x;
  for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[i] = __uint_as_float(((u32)in[i]) << 16);
  }
}

// Flux latents: [B, C, H, W] <-> [B, (H/2)*(W/2), C*4], channel order (c, ph, pw) as diffusers packs them.
extern "C" __global__ void flux_pack_f32(float* __restrict__ out, const float* __restrict__ in, int B, int C, int H, int W) {
  u64 n = (u64)B * C * H * W;
  int H2 = H / 2, W2 = W / 2;
  u64 stride = (u64)gridDim.x * blockDim.x;
  for (u64 o = (u64)blockIdx.x * blockDim.x + threadIdx.x; o < n; o += stride) {
    int f = (int)(o % (u64)(C * 4));
    u64 t = o / (u64)(C * 4);
    int w2 = (int)(t % W2), h2 = (int)((t / W2) % H2), b = (int)(t / ((u64)W2 * H2));
    int c = f / 4, ph = (f / 2) % 2, pw = f % 2;
    out[o] = in[(((u64)b * C + c) * H + (2 * h2 + ph)) * W + (2 * w2 + pw)];
  }
}
extern "C" __global__ void flux_unpack_f32(float* __restrict__ out, const float* __restrict__ in, int B, int C, int H, int W) {
  u64 n = (u64)B * C * H * W;
  int H2 = H / 2, W2 = W / 2;
  u64 stride = (u64)gridDim.x * blockDim.x;
  for (u64 o = (u64)blockIdx.x * blockDim.x + threadIdx.x; o < n; o += stride) {
    int w = (int)(o % W), h = (int)((o / W) % H), c = (int)((o / ((u64)W * H)) % C), b = (int)(o / ((u64)W * H * C));
    int f = c * 4 + (h % 2) * 2 + (w % 2);
    out[o] = in[(((u64)b * H2 + h / 2) * W2 + w / 2) * (C * 4) + f];
  }
}

// Per batch entry b: out[b][c][r] = in[b][r][c] for an in block of rows x cols (batch strides in_stride and
// out_stride, so a block can be part of a longer sequence): FLUX.2's channel-major latents <-> its token-major
// transformer input.
extern "C" __global__ void transpose_f32(float* __restrict__ out, const float* __restrict__ in, int B, int rows, int cols,
                                         u64 in_stride, u64 out_stride) {
  u64 n = (u64)B * rows * cols;
  u64 stride = (u64)gridDim.x * blockDim.x;
  for (u64 o = (u64)blockIdx.x * blockDim.x + threadIdx.x; o < n; o += stride) {
    int r = (int)(o % (u64)rows);
    u64 t = o / (u64)rows;
    int c = (int)(t % (u64)cols), b = (int)(t / (u64)cols);
    out[(u64)b * out_stride + (u64)c * rows + r] = in[(u64)b * in_stride + (u64)r * cols + c];
  }
}
