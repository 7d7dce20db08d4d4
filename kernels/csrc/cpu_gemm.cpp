// effinfer native CPU GEMM for prefill (see kernels/native.py: gemm).
//
// y[m, n] = x[m, k] @ W[n, k]^T (+ bias) for many tokens, W either float32 rows or the project's packed
// int8/int4 codes with a scale and a bias per group of inputs. The loops follow Goto and van de Geijn,
// "Anatomy of High-Performance Matrix Multiplication" (ACM TOMS 34(3), 2008): x is packed once into
// panels of MR tokens, W is packed KC inputs x NR outputs at a time into a panel that stays in L1, and a
// register-blocked kernel multiplies the two. For packed weights the packing step is the
// dequantization, so a quantized GEMM reads each code once and never writes a dense weight to memory:
// the dequantize-then-BLAS route writes (and reads back) 4 bytes per weight, which costs a prefill
// about 8 % on the AMD EPYC machine of this project.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>
#include <omp.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512F__)
constexpr int VL = 16;
#else
constexpr int VL = 8;
#endif
typedef float gv __attribute__((vector_size(VL * 4)));
// MR x NR accumulators (12 vectors) plus two weight vectors and a broadcast fit the 16 AVX2 registers.
constexpr int MR = 6, NR = 2 * VL;
constexpr int64_t KC = 4096 / VL;  // KC x NR floats of W (16 KiB) stay in L1

inline gv loadv(const float* p) { gv v; std::memcpy(&v, p, sizeof v); return v; }
inline void storev(float* p, gv v) { std::memcpy(p, &v, sizeof v); }

struct Weight {
  const float* dense;     // [n, k] float32 rows, or null for packed codes
  const uint8_t* codes;   // [n, k * bits / 8]
  const float* scale;     // [n, k / group]
  const float* gbias;     // [n, k / group]: w = code * scale + gbias
  int bits;
  int64_t group, n, k;

  float at(int64_t row, int64_t col) const {
    if (dense) return dense[row * k + col];
    const uint8_t* r = codes + row * (k * bits / 8);
    const int code = bits == 8 ? r[col] : (r[col / 2] >> (4 * (col & 1))) & 15;
    const int64_t g = row * (k / group) + col / group;
    return code * scale[g] + gbias[g];
  }
};

#if defined(__AVX2__) || defined(__AVX512F__)
// rows[i] <- column i of the 8 x 8 matrix whose rows were rows[0..7]
inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h) {
    __m256 *lo = t + 4 * h, *out = u + 4 * h;
    out[0] = _mm256_shuffle_ps(lo[0], lo[2], _MM_SHUFFLE(1, 0, 1, 0));
    out[1] = _mm256_shuffle_ps(lo[0], lo[2], _MM_SHUFFLE(3, 2, 3, 2));
    out[2] = _mm256_shuffle_ps(lo[1], lo[3], _MM_SHUFFLE(1, 0, 1, 0));
    out[3] = _mm256_shuffle_ps(lo[1], lo[3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// one weight row from input `col` on: its float32 values, or its codes with the scale and bias of each group
struct Row {
  const float* dense;
  const uint8_t* codes;
  const float *scale, *gbias;
};

inline Row row_at(const Weight& w, int64_t row) {
  if (w.dense) return {w.dense + row * w.k, nullptr, nullptr, nullptr};
  const int64_t groups = w.k / w.group;
  return {nullptr, w.codes + row * (w.k * w.bits / 8), w.scale + row * groups, w.gbias + row * groups};
}

// inputs col..col+7 of a row as floats; they lie in group g (the caller checks group % 8 == 0)
inline __m256 row8(const Row& r, int bits, int64_t col, int64_t g) {
  if (r.dense) return _mm256_loadu_ps(r.dense + col);
  __m128i bytes;
  if (bits == 8) {
    bytes = _mm_loadl_epi64((const __m128i*)(r.codes + col));
  } else {  // 4 bytes -> 8 nibbles, the low nibble first
    int32_t four;
    std::memcpy(&four, r.codes + col / 2, 4);
    const __m128i packed = _mm_cvtsi32_si128(four), mask = _mm_set1_epi8(15);
    bytes = _mm_unpacklo_epi8(_mm_and_si128(packed, mask), _mm_and_si128(_mm_srli_epi16(packed, 4), mask));
  }
  const __m256 codes = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
  return _mm256_fmadd_ps(codes, _mm256_set1_ps(r.scale[g]), _mm256_set1_ps(r.gbias[g]));
}
#endif

// panel[kk * NR + j] = W[row0 + j, col0 + kk] (zero past the last row), kk < kc
void pack_weight(const Weight& w, int64_t row0, int64_t col0, int64_t kc, float* panel) {
  const int64_t rows = std::min<int64_t>(NR, w.n - row0);
  int64_t kk = 0;
#if defined(__AVX2__) || defined(__AVX512F__)
  if (rows == NR && (w.dense || w.group % 8 == 0) && col0 % 8 == 0) {
    Row rows_of[NR];
    for (int j = 0; j < NR; ++j) rows_of[j] = row_at(w, row0 + j);
    const int64_t group = w.dense ? 1 : w.group;
    for (; kk + 8 <= kc; kk += 8) {
      const int64_t col = col0 + kk, g = col / group;
      for (int j0 = 0; j0 < NR; j0 += 8) {
        __m256 r[8];
        for (int i = 0; i < 8; ++i) r[i] = row8(rows_of[j0 + i], w.bits, col, g);
        transpose8(r);
        for (int i = 0; i < 8; ++i) _mm256_storeu_ps(panel + (kk + i) * NR + j0, r[i]);
      }
    }
  }
#endif
  for (; kk < kc; ++kk)
    for (int j = 0; j < NR; ++j) panel[kk * NR + j] = j < rows ? w.at(row0 + j, col0 + kk) : 0.f;
}

// panel[kk * MR + i] = x[row0 + i, kk] (zero past the last token), kk < k
void pack_tokens(const float* x, int64_t m, int64_t k, int64_t row0, float* panel) {
  const int64_t rows = std::min<int64_t>(MR, m - row0);
  int64_t kk = 0;
#if defined(__AVX2__) || defined(__AVX512F__)
  if (rows == MR) {
    const __m256i six = _mm256_setr_epi32(-1, -1, -1, -1, -1, -1, 0, 0);
    for (; kk + 8 <= k; kk += 8) {
      __m256 r[8];
      for (int i = 0; i < MR; ++i) r[i] = _mm256_loadu_ps(x + (row0 + i) * k + kk);
      r[6] = r[7] = _mm256_setzero_ps();
      transpose8(r);
      for (int i = 0; i < 8; ++i) _mm256_maskstore_ps(panel + (kk + i) * MR, six, r[i]);
    }
  }
#endif
  for (; kk < k; ++kk)
    for (int i = 0; i < MR; ++i) panel[kk * MR + i] = i < rows ? x[(row0 + i) * k + kk] : 0.f;
}

// c[rows, cols] (row stride ldc) = or += a_panel (kc x MR) @ w_panel (kc x NR); bias added when not accumulating
void kernel(int64_t kc, const float* a, const float* b, float* c, int64_t ldc, bool accumulate, const float* bias,
            int rows, int cols) {
  gv acc[MR][2] = {};
  for (int64_t kk = 0; kk < kc; ++kk) {
    const gv b0 = loadv(b + kk * NR), b1 = loadv(b + kk * NR + VL);
    for (int i = 0; i < MR; ++i) {
      const float ai = a[kk * MR + i];
      acc[i][0] += ai * b0;
      acc[i][1] += ai * b1;
    }
  }
  if (cols == NR) {
    for (int i = 0; i < rows; ++i)
      for (int h = 0; h < 2; ++h) {
        gv v = acc[i][h];
        if (accumulate) v += loadv(c + i * ldc + h * VL);
        else if (bias) v += loadv(bias + h * VL);
        storev(c + i * ldc + h * VL, v);
      }
    return;
  }
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < cols; ++j) {
      const float v = acc[i][j / VL][j % VL];
      c[i * ldc + j] = accumulate ? c[i * ldc + j] + v : v + (bias ? bias[j] : 0.f);
    }
}

void gemm(const float* x, int64_t m, const Weight& w, const float* bias, float* y) {
  const int64_t k = w.k, n = w.n, token_panels = (m + MR - 1) / MR, weight_panels = (n + NR - 1) / NR;
  thread_local std::vector<float> tokens;  // reused: no page faults per call
  tokens.resize(token_panels * k * MR);
  float* xp = tokens.data();
  #pragma omp parallel
  {
    alignas(64) float panel[KC * NR];
    #pragma omp for schedule(static)
    for (int64_t tp = 0; tp < token_panels; ++tp) pack_tokens(x, m, k, tp * MR, xp + tp * k * MR);
    for (int64_t k0 = 0; k0 < k; k0 += KC) {
      const int64_t kc = std::min(KC, k - k0);
      // static schedule: every K block gives a thread the same output panels, so no barrier is needed
      #pragma omp for schedule(static) nowait
      for (int64_t wp = 0; wp < weight_panels; ++wp) {
        const int64_t col = wp * NR;
        pack_weight(w, col, k0, kc, panel);
        for (int64_t tp = 0; tp < token_panels; ++tp)
          kernel(kc, xp + (tp * k + k0) * MR, panel, y + tp * MR * n + col, n, k0 > 0, bias ? bias + col : nullptr,
                 (int)std::min<int64_t>(MR, m - tp * MR), (int)std::min<int64_t>(NR, n - col));
      }
    }
  }
}

}  // namespace

// y[m, n] = x[m, k] @ w[n, k]^T (+ bias[n]); bias may be null
extern "C" void ef_gemm_f32(const float* x, int64_t m, int64_t k, const float* w, int64_t n, const float* bias,
                            float* y) {
  gemm(x, m, Weight{w, nullptr, nullptr, nullptr, 32, k, n, k}, bias, y);
}

// the same with W given as packed codes: W[o, i] = code[o, i] * scale[o, i / group] + gbias[o, i / group]
extern "C" void ef_gemm_packed(const float* x, int64_t m, int64_t k, const uint8_t* codes, const float* scale,
                               const float* gbias, int bits, int64_t group, int64_t n, const float* bias, float* y) {
  gemm(x, m, Weight{nullptr, codes, scale, gbias, bits, group, n, k}, bias, y);
}
