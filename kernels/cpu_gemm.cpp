// Native CPU forward of a compressed MoE layer (kernels/cpu_native.py): the whole op in one call and one OpenMP
// parallel region, like vLLM's fused CPU MoE. No torch headers (plain C ABI, loaded with ctypes): builds in seconds.
//
//   routing   (serial, tiny): pairs (token, function) from topk_ids through func_of_expert (EP: -1 skipped, the
//             weights of one token's identical functions summed), counting-sorted by function; per-token pair lists
//   functions (omp for, dynamic): each active function's pairs start to finish on one thread (stages below)
//   -- the one barrier (at decode none: the calling thread does the output stage alone after the join) --
//   output    (omp for, dynamic, blocks of 64 hidden rows): y = sum of each token's pair rows, with an RS-MoE base
//             + z * B^T (z = the pairs' h rows scattered over the base's units: a few adds per pair, so each
//             thread builds its own copy rather than waiting at a second barrier); y stored in x's dtype
//
// Task (9 int64): row0, rows (unused: rows come from the call), w (address of W [o, k], row stride ldw, dtype T),
// o, k, ldw, in_off, out_off, acc:   out[row0 + i, out_off + j] (+)= sum_kk in[row0 + i, in_off + kk] * W[j, kk]
// in and out are float32 row-major scratch buffers (one row per pair); accumulation in float32.
#include <cmath>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <type_traits>
#include <vector>

namespace {

inline void zero_out(float* out, int64_t ld_out, int64_t out_off, int64_t o, int64_t row0, int64_t rows) {
  for (int64_t i = 0; i < rows; ++i) std::memset(out + (row0 + i) * ld_out + out_off, 0, sizeof(float) * o);
}

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
#endif

// bf16 weights without AVX512-BF16 but with AVX-512: widened in registers (dot_rows_bf16), else dot_rows
template <typename T, int NT>
inline void dot(const float* in, int64_t ld_in, const T* w, int64_t k, float* acc) {
#ifdef __AVX512F__
  if constexpr (std::is_same_v<T, uint16_t>) return dot_rows_bf16<NT>(in, ld_in, w, k, acc);
#endif
  dot_rows<T, NT>(in, ld_in, w, k, acc);
}

template <typename T>
void run_task(const float* in, int64_t ld_in, float* out, int64_t ld_out, const int64_t* t, int64_t row0,
              int64_t rows) {
  const int64_t o = t[3], k = t[4], ldw = t[5], in_off = t[6], out_off = t[7];
  const bool accumulate = t[8] != 0;
  const T* W = reinterpret_cast<const T*>(t[2]);
  if (k == 0) {
    if (!accumulate) zero_out(out, ld_out, out_off, o, row0, rows);
    return;
  }
  float acc[kTok];
  for (int64_t i0 = 0; i0 < rows; i0 += kTok) {
    const int nt = static_cast<int>(rows - i0 < kTok ? rows - i0 : kTok);
    const float* x = in + (row0 + i0) * ld_in + in_off;
    for (int64_t j = 0; j < o; ++j) {
      const T* w = W + j * ldw;
      switch (nt) {
        case 1: dot<T, 1>(x, ld_in, w, k, acc); break;
        case 2: dot<T, 2>(x, ld_in, w, k, acc); break;
        case 3: dot<T, 3>(x, ld_in, w, k, acc); break;
        default: dot<T, kTok>(x, ld_in, w, k, acc); break;
      }
      for (int q = 0; q < nt; ++q) {
        float* po = out + (row0 + i0 + q) * ld_out + out_off + j;
        *po = accumulate ? *po + acc[q] : acc[q];
      }
    }
  }
}


#ifdef __AVX512BF16__
// bfloat16 weights on a CPU with AVX512-BF16: the inputs of the task's rows are rounded to bfloat16 once (as the
// torch path rounds every intermediate to the compute dtype), then VDPBF16PS multiplies 32 weight-input pairs per
// instruction and accumulates in float32. Register blocking: NR weight rows x NT token rows per pass (16
// accumulators at 4 x 4), so each weight load feeds NT products and each input load NR.

// four float32 vectors -> their four horizontal sums
inline __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));  // a02 b02 a13 b13 per lane
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512 abcd = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))),
                                    _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))));
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(abcd),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// acc[r * NT + q] = W[r, :k] . xb[q, :k]  (xb rows zero-padded to a multiple of 32: only the weights need a mask)
template <int NR, int NT>
inline void dot_block(const uint16_t* xb, int64_t kp, const uint16_t* w, int64_t ldw, int64_t k, float* acc) {
  constexpr int CH = NR * NT >= 4 ? 1 : 2;  // two chains per product when there are few (FMA latency)
  __m512 a[CH][NR * NT];  // [chain][r * NT + q]
  for (int c = 0; c < CH; ++c)
    for (int i = 0; i < NR * NT; ++i) a[c][i] = _mm512_setzero_ps();
  int64_t kk = 0;
  for (; kk + 32 * CH <= k; kk += 32 * CH) {
    for (int c = 0; c < CH; ++c) {
      __m512i wv[NR];
      for (int r = 0; r < NR; ++r)
        wv[r] = _mm512_loadu_si512(reinterpret_cast<const void*>(w + r * ldw + kk + 32 * c));
      for (int q = 0; q < NT; ++q) {
        const __m512i xv = _mm512_loadu_si512(reinterpret_cast<const void*>(xb + q * kp + kk + 32 * c));
        for (int r = 0; r < NR; ++r)
          a[c][r * NT + q] = _mm512_dpbf16_ps(a[c][r * NT + q], (__m512bh)wv[r], (__m512bh)xv);
      }
    }
  }
  for (; kk < k; kk += 32) {
    const int64_t left = k - kk;
    const __mmask32 m = left >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((1u << left) - 1);
    __m512i wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = _mm512_maskz_loadu_epi16(m, w + r * ldw + kk);
    for (int q = 0; q < NT; ++q) {
      const __m512i xv = _mm512_loadu_si512(reinterpret_cast<const void*>(xb + q * kp + kk));
      for (int r = 0; r < NR; ++r) a[0][r * NT + q] = _mm512_dpbf16_ps(a[0][r * NT + q], (__m512bh)wv[r], (__m512bh)xv);
    }
  }
  if (CH == 2)
    for (int i = 0; i < NR * NT; ++i) a[0][i] = _mm512_add_ps(a[0][i], a[CH - 1][i]);
  int i = 0;
  for (; i + 4 <= NR * NT; i += 4) _mm_storeu_ps(acc + i, hsum4(a[0][i], a[0][i + 1], a[0][i + 2], a[0][i + 3]));
  for (; i < NR * NT; ++i) acc[i] = _mm512_reduce_add_ps(a[0][i]);
}

// rows [nt, k] of float32 (row stride ld) -> bfloat16 [nt, kp], round to nearest even, zero-padded to kp
inline void to_bf16_rows(const float* x, int64_t ld, int64_t nt, int64_t k, int64_t kp, uint16_t* out) {
  for (int64_t q = 0; q < nt; ++q) {
    for (int64_t kk = 0; kk < kp; kk += 32) {
      const int64_t l0 = k - kk, l1 = k - kk - 16;
      const __m512 lo = _mm512_maskz_loadu_ps(l0 >= 16 ? 0xffff : l0 > 0 ? (1u << l0) - 1 : 0, x + q * ld + kk);
      const __m512 hi = _mm512_maskz_loadu_ps(l1 >= 16 ? 0xffff : l1 > 0 ? (1u << l1) - 1 : 0,
                                              x + q * ld + kk + 16);
      _mm512_storeu_si512(reinterpret_cast<void*>(out + q * kp + kk), (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
  }
}

template <int NR, int NT>
inline void block_out(const uint16_t* xb, int64_t kp, const uint16_t* w, int64_t ldw, int64_t k, float* out,
                      int64_t ld_out, bool accumulate) {
  float acc[NR * NT];
  dot_block<NR, NT>(xb, kp, w, ldw, k, acc);
  for (int q = 0; q < NT; ++q)
    for (int r = 0; r < NR; ++r) {
      float* po = out + q * ld_out + r;
      *po = accumulate ? *po + acc[r * NT + q] : acc[r * NT + q];
    }
}

template <int NR>
inline void block_nt(int nt, const uint16_t* xb, int64_t kp, const uint16_t* w, int64_t ldw, int64_t k, float* out,
                     int64_t ld_out, bool accumulate) {
  switch (nt) {
    case 1: block_out<NR, 1>(xb, kp, w, ldw, k, out, ld_out, accumulate); break;
    case 2: block_out<NR, 2>(xb, kp, w, ldw, k, out, ld_out, accumulate); break;
    case 3: block_out<NR, 3>(xb, kp, w, ldw, k, out, ld_out, accumulate); break;
    default: block_out<NR, 4>(xb, kp, w, ldw, k, out, ld_out, accumulate); break;
  }
}

// out[i, j] (+)= W[j, :k] . xb[i, :k] for rows i < rows (xb: bfloat16 rows zero-padded to kp), j < o.
inline void gemm_bf16(const uint16_t* xb, int64_t kp, int64_t rows, const uint16_t* W, int64_t o, int64_t k,
                      int64_t ldw, float* out, int64_t ld_out, bool accumulate) {
  // Weight rows in chunks that stay in L2 while every token block passes over them. With up to kTok rows (decode)
  // the weights are read once, row after row: one sequential stream is what the hardware prefetcher follows best
  // (4 interleaved rows of a page each measured 1.8x slower at one token, 1.2x at 5-8 tokens).
  const int64_t chunk = rows <= kTok ? o : std::max<int64_t>(4, (256 * 1024 / (2 * k)) / 4 * 4);
  for (int64_t j0 = 0; j0 < o; j0 += chunk) {
    const int64_t j1 = std::min(o, j0 + chunk);
    for (int64_t i0 = 0; i0 < rows; i0 += kTok) {
      const int nt = static_cast<int>(rows - i0 < kTok ? rows - i0 : kTok);
      const uint16_t* x = xb + i0 * kp;
      float* po = out + i0 * ld_out;
      int64_t j = j0;
      if (rows > 2 * kTok)  // 4-row blocks pay off past 8 rows (at 5-8: 1.2x slower than row by row)
        for (; j + 4 <= j1; j += 4) block_nt<4>(nt, x, kp, W + j * ldw, ldw, k, po + j, ld_out, accumulate);
      for (; j < j1; ++j) block_nt<1>(nt, x, kp, W + j * ldw, ldw, k, po + j, ld_out, accumulate);
    }
  }
}

template <>
void run_task<uint16_t>(const float* in, int64_t ld_in, float* out, int64_t ld_out, const int64_t* t,
                        int64_t row0, int64_t rows) {
  const int64_t o = t[3], k = t[4], ldw = t[5], in_off = t[6], out_off = t[7];
  const bool accumulate = t[8] != 0;
  if (k == 0) {
    if (!accumulate) zero_out(out, ld_out, out_off, o, row0, rows);
    return;
  }
  const int64_t kp = (k + 31) / 32 * 32;
  thread_local std::vector<uint16_t> xb;  // all the task's input rows in bfloat16, converted once
  if (static_cast<int64_t>(xb.size()) < rows * kp) xb.resize(rows * kp);
  to_bf16_rows(in + row0 * ld_in + in_off, ld_in, rows, k, kp, xb.data());
  gemm_bf16(xb.data(), kp, rows, reinterpret_cast<const uint16_t*>(t[2]), o, k, ldw,
            out + row0 * ld_out + out_off, ld_out, accumulate);
}

// y[:, j0:j0+o] += z . B[j0:j0+o]^T for the base stage; z [T, zw] float32, converted to bfloat16 once per thread
// and call (``first``) rather than once per block of hidden rows.
inline void base_block(const float* z, int64_t T_tokens, int64_t zw, bool first, const uint16_t* Bj, int64_t o,
                       int64_t ldb, float* y, int64_t ld_y) {
  const int64_t kp = (zw + 31) / 32 * 32;
  thread_local std::vector<uint16_t> zb;
  if (first) {
    if (static_cast<int64_t>(zb.size()) < T_tokens * kp) zb.resize(T_tokens * kp);
    to_bf16_rows(z, zw, T_tokens, zw, kp, zb.data());
  }
  gemm_bf16(zb.data(), kp, T_tokens, Bj, o, zw, ldb, y, ld_y, true);
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

template <typename T>  // (the bf16 overload above, where compiled, is preferred)
inline void base_block(const float* z, int64_t T_tokens, int64_t zw, bool, const T* Bj, int64_t o, int64_t ldb,
                       float* y, int64_t ld_y) {
  const int64_t task[9] = {0, 0, reinterpret_cast<int64_t>(Bj), o, zw, ldb, 0, 0, 1};
  run_task<T>(z, zw, y, ld_y, task, 0, T_tokens);
}

inline void store(float v, float* p) { *p = v; }
inline void store(float v, uint16_t* p) {  // float32 -> bfloat16, round to nearest even (NaN kept a NaN)
  uint32_t b;
  std::memcpy(&b, &v, 4);
  *p = (b & 0x7fffffff) > 0x7f800000 ? static_cast<uint16_t>((b >> 16) | 0x40)
                                     : static_cast<uint16_t>((b + 0x7fff + ((b >> 16) & 1)) >> 16);
}

// The static description of a layer (kernels/cpu_native.py ``_Tables.meta``), int64 fields:
enum Meta {
  kF, kN, kU, kRT, kRD, kTables, kNs, kFuncOfExpert, kE,  // functions, hidden, widths, task tables, routing table
  kZW, kBase, kLdb, kBaseStart, kBaseCount, kBaseOff, kBaseCols,  // RS-MoE base (kZW = 0: none)
  kMetaLen
};

struct Scratch {
  std::mutex lock;  // one call at a time owns the scratch
  std::vector<float> f;
  std::vector<int64_t> i;
  std::vector<float> wv;
};
Scratch& scratch() {
  static Scratch s;
  return s;
}

// Returns 0, 2 for an expert id outside [0, E).
template <typename T, typename Id>
int forward(const int64_t* meta, const T* x, int64_t T_tokens, const Id* ids, const float* topk_w, int64_t K,
            T* out, int threads) {
  const int64_t F = meta[kF], n = meta[kN], U = meta[kU], RT = meta[kRT], RD = meta[kRD], E = meta[kE];
  const int64_t ZW = meta[kZW];
  const int64_t* ns = reinterpret_cast<const int64_t*>(meta[kNs]);
  const int64_t* foe = reinterpret_cast<const int64_t*>(meta[kFuncOfExpert]);
  const int64_t* stage[6];
  const int64_t* at = reinterpret_cast<const int64_t*>(meta[kTables]);
  for (int s = 0; s < 6; ++s) {
    stage[s] = at;
    at += F * ns[s] * 9;
  }
  Scratch& sc = scratch();
  std::lock_guard<std::mutex> guard(sc.lock);
  // ----- routing: pairs in token order, then counting-sorted by function ------------------------------------
  const int64_t NK = T_tokens * K;
  sc.i.resize(5 * NK + 3 * F + T_tokens + 4);
  int64_t* pf = sc.i.data();      // [NK] function of each pair (token order)
  int64_t* pt = pf + NK;          // [NK] token
  int64_t* pos = pt + NK;         // [NK] its row in function order
  int64_t* tok = pos + NK;        // [NK] function order: token
  int64_t* fs = tok + NK;         // [NK] function order: function
  int64_t* cnt = fs + NK;         // [F + 1]
  int64_t* funcs = cnt + F + 1;   // [2A] (id, row0) of the active functions (rows: up to the next row0)
  int64_t* tok_ptr = funcs + 2 * F + 1;  // [T + 1] token t's pairs: pos[tok_ptr[t] .. tok_ptr[t + 1])
  sc.wv.resize(2 * NK + 1);
  float* pw = sc.wv.data();       // [NK] weight (token order)
  float* wgt = pw + NK;           // [NK] function order
  int64_t P = 0;
  for (int64_t t = 0; t < T_tokens; ++t) {
    tok_ptr[t] = P;
    for (int64_t kk = 0; kk < K; ++kk) {
      const int64_t e = static_cast<int64_t>(ids[t * K + kk]);
      if (e < 0 || e >= E) return 2;
      const int64_t f = foe[e];
      if (f < 0) continue;  // expert on another rank
      int64_t j = tok_ptr[t];
      while (j < P && pf[j] != f) ++j;
      if (j < P) {  // identical functions of one token: one pair, weights summed
        pw[j] += topk_w[t * K + kk];
        continue;
      }
      pf[P] = f, pt[P] = t, pw[P] = topk_w[t * K + kk];
      ++P;
    }
  }
  tok_ptr[T_tokens] = P;
  std::memset(cnt, 0, sizeof(int64_t) * (F + 1));
  for (int64_t p = 0; p < P; ++p) ++cnt[pf[p] + 1];
  int64_t A = 0;
  for (int64_t f = 0; f < F; ++f) {
    if (cnt[f + 1] > 0) funcs[2 * A] = f, funcs[2 * A + 1] = cnt[f], ++A;  // row0 = pairs before f
    cnt[f + 1] += cnt[f];
  }
  for (int64_t p = 0; p < P; ++p) {
    const int64_t r = cnt[pf[p]]++;
    pos[p] = r, tok[r] = pt[p], fs[r] = pf[p], wgt[r] = pw[p];
  }
  // ----- scratch: one row per pair (widths: the layer's largest), tokens' float32 output and base input ------
  const int64_t rt = RT > 0 ? RT : 1, rd = RD > 0 ? RD : 1;
  const int64_t need = P * (2 * n + rt + 3 * U + rd) + T_tokens * n;
  if (static_cast<int64_t>(sc.f.size()) < need) sc.f.resize(need);
  float* fp = sc.f.data();
  const Buffers b{fp, n, fp + P * n, rt, fp + P * (n + rt), U, fp + P * (n + rt + 2 * U),
                  fp + P * (n + rt + 3 * U), rd, fp + P * (n + rt + 3 * U + rd)};
  float* yf = fp + P * (2 * n + rt + 3 * U + rd);  // [T, n] float32 output
  const T* B = reinterpret_cast<const T*>(meta[kBase]);
  const int64_t* bstart = reinterpret_cast<const int64_t*>(meta[kBaseStart]);
  const int64_t* bcount = reinterpret_cast<const int64_t*>(meta[kBaseCount]);
  const int64_t* boff = reinterpret_cast<const int64_t*>(meta[kBaseOff]);
  const int64_t* bcols = reinterpret_cast<const int64_t*>(meta[kBaseCols]);
  constexpr int64_t kRows = 64;  // hidden rows per output block
  // blocks of hidden rows: y = sum of each token's pairs (+ z . B^T); ``first``: this thread's first block
  auto output = [&](int64_t j0, bool first, std::vector<float>& zp) {
    const int64_t o = std::min(kRows, n - j0);
    for (int64_t t = 0; t < T_tokens; ++t) {
      float* y = yf + t * n + j0;
      std::memset(y, 0, sizeof(float) * o);
      for (int64_t j = tok_ptr[t]; j < tok_ptr[t + 1]; ++j) {
        const float* src = b.ys + pos[j] * n + j0;
        for (int64_t c = 0; c < o; ++c) y[c] += src[c];
      }
    }
    if (ZW) {
      if (first) {  // this thread's copy of z [T, ZW]: a few adds per pair, cheaper than a second barrier
        zp.assign(T_tokens * ZW, 0.0f);
        for (int64_t r = 0; r < P; ++r) {
          const int64_t f = fs[r];
          const float* hp = b.h + r * U + bstart[f];
          const int64_t* cols = bcols + boff[f];
          float* zt = zp.data() + tok[r] * ZW;
          for (int64_t i = 0; i < bcount[f]; ++i) zt[cols[i]] += hp[i];
        }
      }
      base_block(zp.data(), T_tokens, ZW, first, B + j0 * meta[kLdb], o, meta[kLdb], yf + j0, n);
    }
    for (int64_t t = 0; t < T_tokens; ++t)
      for (int64_t c = j0; c < j0 + o; ++c) store(yf[t * n + c], out + t * n + c);
  };
  // With few pairs (decode, up to 128 pairs at n = 2048) the calling thread does the output stage alone after the
  // join: a call then has one synchronization (each costs a scheduler time slice when a thread is descheduled:
  // measured 2x a whole decode call on a loaded machine), for a base GEMM read by one thread (3 MB at Qwen3-30B's
  // shapes, a few % of the call) instead of two.
  const bool serial_out = P * n <= (int64_t{1} << 18);
#pragma omp parallel num_threads(threads)
  {
    if (serial_out) {
#pragma omp for schedule(dynamic, 1) nowait
      for (int64_t a = 0; a < A; ++a) {
        const int64_t f = funcs[2 * a], row0 = funcs[2 * a + 1];
        run_function<T>(x, tok, wgt, stage, ns, f, row0, (a + 1 < A ? funcs[2 * a + 3] : P) - row0, b);
      }
    } else {
#pragma omp for schedule(dynamic, 1)
      for (int64_t a = 0; a < A; ++a) {
        const int64_t f = funcs[2 * a], row0 = funcs[2 * a + 1];
        run_function<T>(x, tok, wgt, stage, ns, f, row0, (a + 1 < A ? funcs[2 * a + 3] : P) - row0, b);
      }
      // the one barrier: every pair's Y and H rows are written
      thread_local std::vector<float> zp;
      bool first = true;
#pragma omp for schedule(dynamic, 1)
      for (int64_t j0 = 0; j0 < n; j0 += kRows) {
        output(j0, first, zp);
        first = false;
      }
    }
  }
  if (serial_out) {
    std::vector<float> zp;
    for (int64_t j0 = 0; j0 < n; j0 += kRows) output(j0, j0 == 0, zp);
  }
  return 0;
}

}  // namespace

extern "C" {
// out [T, n] (x's dtype) = this rank's experts on x [T, n] for routing topk_ids [T, K] (int32 or int64: ids64)
// and topk_w [T, K] float32; meta: the layer (enum Meta). dtype 0: bfloat16, 1: float32 (x, out and weights).
// Returns 0; 1 for an unknown dtype, 2 for an expert id outside [0, E).
int moe_lowrank_forward(const int64_t* meta, const void* x, int64_t T_tokens, const void* ids, int ids64,
                        const float* topk_w, int64_t K, void* out, int dtype, int threads) {
  if (dtype == 0) {
    auto xx = static_cast<const uint16_t*>(x);
    auto oo = static_cast<uint16_t*>(out);
    return ids64 ? forward(meta, xx, T_tokens, static_cast<const int64_t*>(ids), topk_w, K, oo, threads)
                 : forward(meta, xx, T_tokens, static_cast<const int32_t*>(ids), topk_w, K, oo, threads);
  }
  if (dtype == 1) {
    auto xx = static_cast<const float*>(x);
    auto oo = static_cast<float*>(out);
    return ids64 ? forward(meta, xx, T_tokens, static_cast<const int64_t*>(ids), topk_w, K, oo, threads)
                 : forward(meta, xx, T_tokens, static_cast<const int32_t*>(ids), topk_w, K, oo, threads);
  }
  return 1;
}
}
