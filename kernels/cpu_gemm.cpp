// Native CPU forward of a compressed MoE layer (kernels/cpu_native.py): one OpenMP region per call, each active
// expert function (the rows of its (token, function) pairs) run start to finish by one thread, so a call waits at
// one join only, like vLLM's fused CPU MoE. No torch headers (plain C ABI, loaded with ctypes): builds in seconds.
//
// Task (9 int64): row0, rows (filled per call), w (address of W [o, k], row stride ldw, dtype T), o, k, ldw,
// in_off, out_off, acc:   out[row0 + i, out_off + j] (+)= sum_kk in[row0 + i, in_off + kk] * W[j, kk]
// in and out are float32 row-major scratch buffers (one row per pair); accumulation in float32.
#include <cmath>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline float to_f32(uint16_t v) {
  uint32_t b = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
inline float to_f32(float v) { return v; }

constexpr int kTok = 4;  // tokens sharing one pass over a weight row

template <typename T, int NT>
inline void dot_rows(const float* in, int64_t ld_in, const T* w, int64_t k, float* acc) {
  constexpr int V = 16;  // one 512-bit float32 vector per token
  float a[NT][V] = {};
  int64_t kk = 0;
  for (; kk + V <= k; kk += V) {
    float wv[V];
    for (int l = 0; l < V; ++l) wv[l] = to_f32(w[kk + l]);
    for (int q = 0; q < NT; ++q) {
      const float* x = in + q * ld_in + kk;
      for (int l = 0; l < V; ++l) a[q][l] += wv[l] * x[l];
    }
  }
  for (int q = 0; q < NT; ++q) {
    float sum = 0;
    for (int l = 0; l < V; ++l) sum += a[q][l];
    for (int64_t t = kk; t < k; ++t) sum += to_f32(w[t]) * in[q * ld_in + t];
    acc[q] = sum;
  }
}

#ifdef __AVX512F__
// bfloat16 weights: 16 at a time widened to float32 (shift into the high half), FMA with each token's row.
template <int NT>
inline void dot_rows_bf16(const float* in, int64_t ld_in, const uint16_t* w, int64_t k, float* acc) {
  __m512 a[NT], b[NT];  // two accumulator chains per token: FMA latency, not throughput, bounds one chain
  for (int q = 0; q < NT; ++q) a[q] = b[q] = _mm512_setzero_ps();
  int64_t kk = 0;
  for (; kk + 32 <= k; kk += 32) {
    const __m512i wb = _mm512_loadu_si512(reinterpret_cast<const void*>(w + kk));
    const __m512 w0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(wb)), 16));
    const __m512 w1 = _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(wb, 1)), 16));
    for (int q = 0; q < NT; ++q) {
      a[q] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(in + q * ld_in + kk), a[q]);
      b[q] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(in + q * ld_in + kk + 16), b[q]);
    }
  }
  for (; kk + 16 <= k; kk += 16) {
    const __m256i wb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + kk));
    const __m512 wv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(wb), 16));
    for (int q = 0; q < NT; ++q) a[q] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(in + q * ld_in + kk), a[q]);
  }
  if (kk < k) {
    const __mmask16 m = static_cast<__mmask16>((1u << (k - kk)) - 1);
    const __m256i wb = _mm256_maskz_loadu_epi16(m, w + kk);
    const __m512 wv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(wb), 16));
    for (int q = 0; q < NT; ++q) a[q] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, in + q * ld_in + kk), a[q]);
  }
  for (int q = 0; q < NT; ++q) acc[q] = _mm512_reduce_add_ps(_mm512_add_ps(a[q], b[q]));
}
template <>
inline void dot_rows<uint16_t, 1>(const float* i, int64_t l, const uint16_t* w, int64_t k, float* a) {
  dot_rows_bf16<1>(i, l, w, k, a);
}
template <>
inline void dot_rows<uint16_t, 2>(const float* i, int64_t l, const uint16_t* w, int64_t k, float* a) {
  dot_rows_bf16<2>(i, l, w, k, a);
}
template <>
inline void dot_rows<uint16_t, 3>(const float* i, int64_t l, const uint16_t* w, int64_t k, float* a) {
  dot_rows_bf16<3>(i, l, w, k, a);
}
template <>
inline void dot_rows<uint16_t, 4>(const float* i, int64_t l, const uint16_t* w, int64_t k, float* a) {
  dot_rows_bf16<4>(i, l, w, k, a);
}
#endif

template <typename T>
void run_task(const float* in, int64_t ld_in, float* out, int64_t ld_out, const int64_t* t, int64_t row0,
              int64_t rows) {
  const int64_t o = t[3], k = t[4], ldw = t[5], in_off = t[6], out_off = t[7];
  const bool accumulate = t[8] != 0;
  const T* W = reinterpret_cast<const T*>(t[2]);
  float acc[kTok];
  for (int64_t i0 = 0; i0 < rows; i0 += kTok) {
    const int nt = static_cast<int>(rows - i0 < kTok ? rows - i0 : kTok);
    const float* x = in + (row0 + i0) * ld_in + in_off;
    for (int64_t j = 0; j < o; ++j) {
      const T* w = W + j * ldw;
      switch (nt) {
        case 1: dot_rows<T, 1>(x, ld_in, w, k, acc); break;
        case 2: dot_rows<T, 2>(x, ld_in, w, k, acc); break;
        case 3: dot_rows<T, 3>(x, ld_in, w, k, acc); break;
        default: dot_rows<T, kTok>(x, ld_in, w, k, acc); break;
      }
      for (int q = 0; q < nt; ++q) {
        float* po = out + (row0 + i0 + q) * ld_out + out_off + j;
        *po = accumulate ? *po + acc[q] : acc[q];
      }
    }
  }
}

#ifdef __AVX512BF16__
// bfloat16 weights on a CPU with AVX512-BF16: the inputs of a block of tokens are rounded to bfloat16 once (as the
// torch path rounds every intermediate to the compute dtype), then VDPBF16PS multiplies 32 weight-input pairs per
// instruction and accumulates in float32: no widening of the weights, a third of the instructions of the FMA loop.
template <int NT>
inline void dot_rows_dpbf16(const uint16_t* xb, int64_t kp, const uint16_t* w, int64_t k, float* acc) {
  __m512 a[NT], b[NT];
  for (int q = 0; q < NT; ++q) a[q] = b[q] = _mm512_setzero_ps();
  int64_t kk = 0;
  for (; kk + 64 <= k; kk += 64) {
    const __m512i w0 = _mm512_loadu_si512(reinterpret_cast<const void*>(w + kk));
    const __m512i w1 = _mm512_loadu_si512(reinterpret_cast<const void*>(w + kk + 32));
    for (int q = 0; q < NT; ++q) {
      const uint16_t* x = xb + q * kp + kk;
      a[q] = _mm512_dpbf16_ps(a[q], (__m512bh)w0, (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(x)));
      b[q] = _mm512_dpbf16_ps(b[q], (__m512bh)w1,
                              (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(x + 32)));
    }
  }
  for (; kk < k; kk += 32) {  // the inputs are zero-padded to kp: only the weights need a mask
    const int64_t left = k - kk;
    const __mmask32 m = left >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((1u << left) - 1);
    const __m512i wv = _mm512_maskz_loadu_epi16(m, w + kk);
    for (int q = 0; q < NT; ++q)
      a[q] = _mm512_dpbf16_ps(a[q], (__m512bh)wv,
                              (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(xb + q * kp + kk)));
  }
  for (int q = 0; q < NT; ++q) acc[q] = _mm512_reduce_add_ps(_mm512_add_ps(a[q], b[q]));
}

// rows [nt, k] of float32 (row stride ld) -> bfloat16 [nt, kp], round to nearest even, zero-padded to kp
inline void to_bf16_rows(const float* x, int64_t ld, int nt, int64_t k, int64_t kp, uint16_t* out) {
  for (int q = 0; q < nt; ++q) {
    for (int64_t kk = 0; kk < kp; kk += 32) {
      const int64_t l0 = k - kk, l1 = k - kk - 16;
      const __m512 lo = _mm512_maskz_loadu_ps(l0 >= 16 ? 0xffff : l0 > 0 ? (1u << l0) - 1 : 0, x + q * ld + kk);
      const __m512 hi = _mm512_maskz_loadu_ps(l1 >= 16 ? 0xffff : l1 > 0 ? (1u << l1) - 1 : 0,
                                              x + q * ld + kk + 16);
      _mm512_storeu_si512(reinterpret_cast<void*>(out + q * kp + kk), (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
  }
}

template <>
void run_task<uint16_t>(const float* in, int64_t ld_in, float* out, int64_t ld_out, const int64_t* t,
                        int64_t row0, int64_t rows) {
  const int64_t o = t[3], k = t[4], ldw = t[5], in_off = t[6], out_off = t[7];
  const bool accumulate = t[8] != 0;
  const uint16_t* W = reinterpret_cast<const uint16_t*>(t[2]);
  const int64_t kp = (k + 31) / 32 * 32;
  thread_local std::vector<uint16_t> xb;
  if (static_cast<int64_t>(xb.size()) < kTok * kp) xb.resize(kTok * kp);
  float acc[kTok];
  for (int64_t i0 = 0; i0 < rows; i0 += kTok) {
    const int nt = static_cast<int>(rows - i0 < kTok ? rows - i0 : kTok);
    to_bf16_rows(in + (row0 + i0) * ld_in + in_off, ld_in, nt, k, kp, xb.data());
    for (int64_t j = 0; j < o; ++j) {
      const uint16_t* w = W + j * ldw;
      switch (nt) {
        case 1: dot_rows_dpbf16<1>(xb.data(), kp, w, k, acc); break;
        case 2: dot_rows_dpbf16<2>(xb.data(), kp, w, k, acc); break;
        case 3: dot_rows_dpbf16<3>(xb.data(), kp, w, k, acc); break;
        default: dot_rows_dpbf16<kTok>(xb.data(), kp, w, k, acc); break;
      }
      for (int q = 0; q < nt; ++q) {
        float* po = out + (row0 + i0 + q) * ld_out + out_off + j;
        *po = accumulate ? *po + acc[q] : acc[q];
      }
    }
  }
}
#endif

struct Buffers {
  float* xs; int64_t n;  // [P, n] the pairs' inputs
  float* t; int64_t rt;  // [P, rt] gate | up shrinks
  float* gu; int64_t u;  // [P, 2u] gate | up
  float* h;  // [P, u] w · silu(gate) · up
  float* s; int64_t rd;  // [P, rd] down shrink
  float* ys;  // [P, n] each pair's weighted output
};

// stages: A_gu xs->gu, A_t xs->t, B t->gu, C_y h->ys, C_s h->s, D s->ys
template <typename T>
void run_function(const T* x, const int64_t* tok, const float* w, const int64_t* const* stage, const int64_t* ns,
                  int64_t f, int64_t row0, int64_t rows, const Buffers& b) {
  for (int64_t p = row0; p < row0 + rows; ++p) {
    const T* src = x + tok[p] * b.n;
    float* dst = b.xs + p * b.n;
    for (int64_t c = 0; c < b.n; ++c) dst[c] = to_f32(src[c]);
  }
  auto run = [&](int s, const float* in, int64_t ld_in, float* out, int64_t ld_out) {
    const int64_t* t = stage[s] + f * ns[s] * 9;
    for (int64_t i = 0; i < ns[s]; ++i, t += 9) {
      if (t[3] > 0) run_task<T>(in, ld_in, out, ld_out, t, row0, rows);
    }
  };
  run(0, b.xs, b.n, b.gu, 2 * b.u);
  run(1, b.xs, b.n, b.t, b.rt);
  run(2, b.t, b.rt, b.gu, 2 * b.u);
  for (int64_t p = row0; p < row0 + rows; ++p) {
    const float* g = b.gu + p * 2 * b.u;
    const float* up = g + b.u;
    float* hp = b.h + p * b.u;
    const float wp = w[p];
    for (int64_t j = 0; j < b.u; ++j) hp[j] = wp * g[j] / (1.0f + std::exp(-g[j])) * up[j];
  }
  run(3, b.h, b.u, b.ys, b.n);
  run(4, b.h, b.u, b.s, b.rd);
  run(5, b.s, b.rd, b.ys, b.n);
}

template <typename T>
void forward(const T* x, int64_t T_tokens, const int64_t* tok, const float* w, int64_t P, const int64_t* funcs,
             int64_t A, const int64_t* tables, const int64_t* ns, int64_t F, const Buffers& b, float* y,
             int threads) {
  const int64_t* stage[6];
  const int64_t* at = tables;
  for (int s = 0; s < 6; ++s) {
    stage[s] = at;
    at += F * ns[s] * 9;
  }
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t a = 0; a < A; ++a) {
    run_function<T>(x, tok, w, stage, ns, funcs[3 * a], funcs[3 * a + 1], funcs[3 * a + 2], b);
  }
  std::memset(y, 0, sizeof(float) * T_tokens * b.n);
  for (int64_t p = 0; p < P; ++p) {  // pairs into tokens (one thread: no two writers of a token row)
    float* dst = y + tok[p] * b.n;
    const float* src = b.ys + p * b.n;
    for (int64_t c = 0; c < b.n; ++c) dst[c] += src[c];
  }
}

}  // namespace

extern "C" {
// y [T, n] float32 = sum over pairs p of ys[p] for the active functions funcs [A, 3] (id, row0, rows); x [T, n]
// and the weights are dtype 0: bfloat16 or 1: float32. Returns 0, or 1 for an unknown dtype.
int moe_lowrank_forward(const void* x, int64_t T_tokens, const int64_t* tok, const float* w, int64_t P,
                        const int64_t* funcs, int64_t A, const int64_t* tables, const int64_t* ns, int64_t F,
                        float* xs, int64_t n, float* t, int64_t rt, float* gu, int64_t u, float* h, float* s,
                        int64_t rd, float* ys, float* y, int dtype, int threads) {
  const Buffers b{xs, n, t, rt, gu, u, h, s, rd, ys};
  if (dtype == 0) {
    forward(static_cast<const uint16_t*>(x), T_tokens, tok, w, P, funcs, A, tables, ns, F, b, y, threads);
  } else if (dtype == 1) {
    forward(static_cast<const float*>(x), T_tokens, tok, w, P, funcs, A, tables, ns, F, b, y, threads);
  } else {
    return 1;
  }
  return 0;
}
}
