// effinfer native CPU kernels for small-batch decoding (see kernels/native.py).
//
// Plain C++ over raw pointers, compiled once per machine with -O3 -march=native and loaded
// through ctypes. Vectors are GCC vector extensions, so one source gives AVX2 code on an AVX2
// CPU and AVX-512 code on an AVX-512 one. OpenMP is the libgomp torch already loaded, so these
// kernels and torch's own ops share one thread pool (two pools would spin against each other).
//
// Every matrix-vector product streams its weight once with every token of the call (n <= 8)
// multiplied against it while it is in registers. For one token (and, float32, up to four) each thread
// reads several rows that lie far apart at once: separate sequential streams in different pages, every
// input vector loaded once for all of them. One row at a time spends a tenth to a quarter of the stream
// on loading the input, and adjacent rows read together interleave streams inside the same pages, which
// the prefetchers follow worst of all (benchmarks/gemv_streams.py measures each pattern).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <omp.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define EF_VEC 16
#else
#define EF_VEC 8
#endif

typedef float vf __attribute__((vector_size(EF_VEC * 4)));
typedef uint8_t vb __attribute__((vector_size(EF_VEC)));

static inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
// EF_VEC unsigned bytes as floats; nibbles(): the low and high nibbles of EF_VEC bytes as floats.
// Intrinsics where GCC's generic byte-vector conversion would be scalarized.
#if defined(__AVX512F__)
static inline vf widen(__m128i b) { return (vf)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b)); }
static inline __m128i load_bytes(const uint8_t* p) { return _mm_loadu_si128((const __m128i*)p); }
#elif defined(__AVX2__)
static inline vf widen(__m128i b) { return (vf)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)); }
static inline __m128i load_bytes(const uint8_t* p) { return _mm_loadl_epi64((const __m128i*)p); }
#endif
#if defined(__AVX2__) || defined(__AVX512F__)
static inline vf bytes(const uint8_t* p) { return widen(load_bytes(p)); }
static inline void nibbles(const uint8_t* p, vf& lo, vf& hi) {
  const __m128i b = load_bytes(p), mask = _mm_set1_epi8(15);
  lo = widen(_mm_and_si128(b, mask));
  hi = widen(_mm_and_si128(_mm_srli_epi16(b, 4), mask));
}
#else
static inline vf bytes(const uint8_t* p) { vb v; std::memcpy(&v, p, sizeof v); return __builtin_convertvector(v, vf); }
static inline void nibbles(const uint8_t* p, vf& lo, vf& hi) {
  vb b; std::memcpy(&b, p, sizeof b);
  lo = __builtin_convertvector(b & 15, vf);
  hi = __builtin_convertvector(b >> 4, vf);
}
#endif
static inline float hsum(vf v) { float s = 0.f; for (int i = 0; i < EF_VEC; ++i) s += v[i]; return s; }

// e^x for EF_VEC floats (Cephes' expf: x = n ln2 + r, a degree-6 polynomial in r, times 2^n), within ~2 ulp of
// std::exp; inputs clamped to [-87.3, 88.3] (the float range of 2^n).
typedef int32_t vi __attribute__((vector_size(EF_VEC * 4)));
static inline vf vexp(vf x) {
  const vf lo = vf{} - 87.3f, hi = vf{} + 88.3f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const vf scaled = x * 1.44269504088896341f;
  const vi n = __builtin_convertvector(scaled + (scaled >= 0.f ? vf{} + 0.5f : vf{} - 0.5f), vi);
  const vf nf = __builtin_convertvector(n, vf);
  const vf r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  vf poly = vf{} + 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const vf e = poly * r * r + r + 1.f;
  const vi bits = (n + 127) << 23;
  vf two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return e * two_n;
}

// the horizontal sums of 8 vectors, as 8 floats at out
static inline void hsum8(const vf* a, float* out) {
#if EF_VEC == 8 && defined(__AVX2__)
  const __m256 t0 = _mm256_hadd_ps((__m256)a[0], (__m256)a[1]), t1 = _mm256_hadd_ps((__m256)a[2], (__m256)a[3]);
  const __m256 t2 = _mm256_hadd_ps((__m256)a[4], (__m256)a[5]), t3 = _mm256_hadd_ps((__m256)a[6], (__m256)a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31)));
#else
  for (int k = 0; k < 8; ++k) out[k] = hsum(a[k]);
#endif
}

#ifndef EF_ROWS
#define EF_ROWS 4
#endif
static const int ROWS = EF_ROWS;  // output rows per tile
static const int MAXN = 8;   // tokens per call

#include <type_traits>
// f(std::integral_constant<int, n>) for n in 1..MAXN
template <typename F>
static inline void dispatch_tokens(int64_t n, F&& f) {
  switch (n) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

extern "C" int ef_abi_version() { return 10; }
extern "C" int ef_vector_width() { return EF_VEC; }

// ---------------------------------------------------------------- dense float32

// Kernels are templates on the token count N so their accumulators stay in registers.
// One output row at a time, UNROLL independent accumulators per token: the tile reads one sequential
// stream (like a plain sum over memory), which the hardware prefetcher follows best.
template <int N>
static void dense_row(const float* x, int64_t in, const float* w, float* acc) {
  // U * N accumulators must fit the 16 vector registers with the loads: 4 for one token, 2 for two, 1 above
  constexpr int U = N == 1 ? 4 : (N == 2 ? 2 : 1);
  vf a[U][N];
  for (int u = 0; u < U; ++u) for (int t = 0; t < N; ++t) a[u][t] = vf{};
  const int64_t step = U * EF_VEC, body = in - in % step;
  for (int64_t i = 0; i < body; i += step)
    for (int u = 0; u < U; ++u) {
      const vf wv = load(w + i + u * EF_VEC);
      for (int t = 0; t < N; ++t) a[u][t] += wv * load(x + t * in + i + u * EF_VEC);
    }
  for (int t = 0; t < N; ++t) {
    vf sum = a[0][t];
    for (int u = 1; u < U; ++u) sum += a[u][t];
    float s = hsum(sum);
    for (int64_t i = body; i < in; ++i) s += w[i] * x[t * in + i];
    acc[t] = s;
  }
}

// y_j[n, out_j] = x[n, in] @ w_j[out_j, in]^T (+ bias_j) for `count` weights sharing one input:
// one parallel region covers the rows of all of them (fused QKV / gate-up projections).
// Runs compute(j, row, rows, acc) on every tile of ROWS output rows of `count` weights in one parallel region
// (acc: rows x MAXN results) and stores y_j[t, row + r] = acc[r, t] + bias_j[row + r].
template <typename Compute>
static void for_each_tile(int64_t n, int64_t count, const int64_t* out, const float* const* bias, float* const* y,
                          Compute&& compute) {
  int64_t tiles[16 + 1] = {0};
  for (int64_t j = 0; j < count; ++j) tiles[j + 1] = tiles[j] + (out[j] + ROWS - 1) / ROWS;
  #pragma omp parallel for schedule(static)
  for (int64_t tile = 0; tile < tiles[count]; ++tile) {
    int64_t j = 0;
    while (tile >= tiles[j + 1]) ++j;
    const int64_t row = (tile - tiles[j]) * ROWS, rows = out[j] - row < ROWS ? out[j] - row : ROWS;
    float acc[ROWS * MAXN];
    compute(j, row, rows, acc);
    for (int r = 0; r < rows; ++r)
      for (int t = 0; t < n; ++t)
        y[j][t * out[j] + row + r] = acc[r * MAXN + t] + (bias[j] ? bias[j][row + r] : 0.f);
  }
}

// S output rows at once that lie far apart (row i of each of S equal parts of a thread's share): S sequential
// streams in different pages, every x vector loaded once for all S rows. A one-row dot product loads x (from L1) as
// often as it loads weights, and those loads cost its weight stream 10-25 %; rows next to each other interleave
// streams inside the same pages, which the prefetchers follow worse still. Measured on the AMD EPYC machine (256 MiB
// of rows of 576, 2 threads, ratio to a one-stream vector sum over memory): 4 far rows 1.06, 2 far rows 1.00-1.02,
// one row at a time 0.71-0.78, two adjacent rows 0.61; a four-stream read 1.10.
// Each stream keeps a cursor (weight, row, address) that steps one row at a time, and the S sums of a token are
// reduced together; with one token each stream gives a whole 64-byte line per iteration. Against a search for each
// row's weight, one scalar reduction per row and half a line per iteration (Dec 7, SmolLM2's 121 float32 matmuls
// in huge pages, 2 threads, 1000 interleaved rounds): 1.04x; in a decode step's profile the matmuls took 0.92x and
// the output head 0.91x as long.
struct RowCursor {
  int64_t weight, row;
  const float* at;
};

// sums[k] = the sum of the lanes of a[k], for k < S
template <int S>
static inline void hsums(const vf* a, float* sums) {
#if EF_VEC == 8 && defined(__AVX2__)
  if constexpr (S == 4) {
    const __m256 t0 = _mm256_hadd_ps((__m256)a[0], (__m256)a[1]), t1 = _mm256_hadd_ps((__m256)a[2], (__m256)a[3]);
    const __m256 u = _mm256_hadd_ps(t0, t1);
    _mm_storeu_ps(sums, _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1)));
    return;
  }
#endif
  for (int k = 0; k < S; ++k) sums[k] = hsum(a[k]);
}

// U vectors of each stream per iteration: for one token a whole 64-byte line of each (AVX2: two vectors, ~2 % faster
// than one); more tokens keep one (their N * S accumulators fill the registers).
template <int S, int N>
static void dense_far(const float* x, int64_t in, const RowCursor* c, float (*sums)[S]) {
  constexpr int U = N == 1 && EF_VEC < 16 ? 16 / EF_VEC : 1;
  vf a[N][U][S];
  for (int t = 0; t < N; ++t)
    for (int u = 0; u < U; ++u)
      for (int k = 0; k < S; ++k) a[t][u][k] = vf{};
  auto accumulate = [&](int64_t i, int u) {
    vf v[S];
    for (int k = 0; k < S; ++k) v[k] = load(c[k].at + i);
    for (int t = 0; t < N; ++t) {
      const vf xv = load(x + t * in + i);
      for (int k = 0; k < S; ++k) a[t][u][k] += v[k] * xv;
    }
  };
  int64_t i = 0;
  for (; i + U * EF_VEC <= in; i += U * EF_VEC)
    for (int u = 0; u < U; ++u) accumulate(i + u * EF_VEC, u);
  for (; i + EF_VEC <= in; i += EF_VEC) accumulate(i, 0);
  for (int t = 0; t < N; ++t) {
    for (int u = 1; u < U; ++u)
      for (int k = 0; k < S; ++k) a[t][0][k] += a[t][u][k];
    hsums<S>(a[t][0], sums[t]);
    for (int64_t j = i; j < in; ++j)
      for (int k = 0; k < S; ++k) sums[t][k] += c[k].at[j] * x[t * in + j];
  }
}

// The far-rows GEMV for up to 5 tokens (4 streams for 1-2 tokens, 2 for 3-5: S * N accumulators <= 10, with the
// S weight vectors and the input in the 16 registers; 6 tokens measured no faster than one row at a time): each
// thread takes a contiguous share of the rows of all `count` weights and walks S parts of it side by side.
template <int S, int N>
static void linear_f32_far(const float* x, int64_t in, int64_t count, const float* const* w, const int64_t* out,
                           const float* const* bias, float* const* y) {
  int64_t first[16 + 1] = {0};  // first global row of each weight
  for (int64_t j = 0; j < count; ++j) first[j + 1] = first[j] + out[j];
  const int64_t rows = first[count];
  auto cursor_at = [&](int64_t r) {
    int64_t j = 0;
    while (r >= first[j + 1]) ++j;
    return RowCursor{j, r - first[j], w[j] + (r - first[j]) * in};
  };
  auto store = [&](const RowCursor& c, int64_t t, float value) {
    y[c.weight][t * out[c.weight] + c.row] = value + (bias[c.weight] ? bias[c.weight][c.row] : 0.f);
  };
  auto advance = [&](RowCursor& c) {
    c.at += in;
    if (++c.row < out[c.weight]) return;
    int64_t next = c.weight + 1;
    while (next < count && out[next] == 0) ++next;  // a weight may have no rows
    c = RowCursor{next, 0, next < count ? w[next] : nullptr};
  };
  #pragma omp parallel
  {
    const int64_t threads = omp_get_num_threads(), id = omp_get_thread_num();
    const int64_t lo = rows * id / threads, hi = rows * (id + 1) / threads, part = (hi - lo) / S;
    RowCursor c[S];
    for (int k = 0; k < S; ++k) c[k] = cursor_at(lo + k * part);
    float sums[N][S];
    for (int64_t i = 0; i < part; ++i) {
      dense_far<S, N>(x, in, c, sums);
      for (int k = 0; k < S; ++k) {
        for (int t = 0; t < N; ++t) store(c[k], t, sums[t][k]);
        advance(c[k]);
      }
    }
    if (lo + S * part < hi) {  // the share's last (hi - lo) % S rows, one at a time
      RowCursor last = cursor_at(lo + S * part);
      float acc[MAXN];
      for (int64_t r = lo + S * part; r < hi; ++r) {
        dense_row<N>(x, in, last.at, acc);
        for (int t = 0; t < N; ++t) store(last, t, acc[t]);
        advance(last);
      }
    }
  }
}

extern "C" void ef_linear_f32(const float* x, int64_t n, int64_t in, int64_t count, const float* const* w,
                              const int64_t* out, const float* const* bias, float* const* y) {
  switch (n) {
    case 1: return linear_f32_far<4, 1>(x, in, count, w, out, bias, y);
    case 2: return linear_f32_far<4, 2>(x, in, count, w, out, bias, y);
    case 3: return linear_f32_far<2, 3>(x, in, count, w, out, bias, y);
    case 4: return linear_f32_far<2, 4>(x, in, count, w, out, bias, y);
    case 5: return linear_f32_far<2, 5>(x, in, count, w, out, bias, y);
  }
  for_each_tile(n, count, out, bias, y, [&](int64_t j, int64_t row, int64_t rows, float* acc) {
    for (int64_t r = 0; r < rows; ++r)
      dispatch_tokens(n, [&](auto N) { dense_row<N.value>(x, in, w[j] + (row + r) * in, acc + r * MAXN); });
  });
}

// A read-bandwidth probe: the sum of p[0..n), every thread reading its share as four sequential streams far apart
// (on the AMD EPYC machines of this project several streams per core read 10-20 % faster than one, so a roofline
// measured with one stream per core sits below what the far-rows GEMV above reaches).
extern "C" double ef_stream_read(const float* p, int64_t n) {
  constexpr int S = 4;
  double total = 0.0;
  #pragma omp parallel reduction(+ : total)
  {
    const int64_t threads = omp_get_num_threads(), id = omp_get_thread_num();
    const int64_t lo = n * id / threads, hi = n * (id + 1) / threads;
    const int64_t part = (hi - lo) / (S * 2 * EF_VEC) * 2 * EF_VEC;  // whole vector pairs per stream
    vf a[S][2];
    for (int k = 0; k < S; ++k) a[k][0] = a[k][1] = vf{};
    for (int64_t i = 0; i < part; i += 2 * EF_VEC)
      for (int k = 0; k < S; ++k) {
        a[k][0] += load(p + lo + k * part + i);
        a[k][1] += load(p + lo + k * part + i + EF_VEC);
      }
    double sum = 0.0;
    for (int k = 0; k < S; ++k) sum += hsum(a[k][0] + a[k][1]);
    for (int64_t i = lo + S * part; i < hi; ++i) sum += p[i];
    total += sum;
  }
  return total;
}

// ---------------------------------------------------------------- packed int8 / int4
// w = code * scale[g] + gbias[g] per group of `group` inputs, so
// x . w = sum_g scale[g] * (x_g . codes_g) + gbias[g] * sum(x_g): the group sums of x come once per call.
//
// int4 codes are packed two per byte, the even input in the low nibble. The kernel reads a block of
// 2*EF_VEC codes as EF_VEC bytes, so it multiplies the low nibbles with the block's even inputs and the
// high nibbles with its odd ones: `xs` holds x with each block's inputs reordered evens-then-odds.

template <int N, int BITS>
static void packed_tile(const float* xs, const float* xsum, int64_t in, int64_t group,
                        const uint8_t* codes, int64_t stride, const float* scale, const float* gbias,
                        int64_t rows, float* acc) {
  const int n = N, bits = BITS;
  const int64_t groups = in / group;
  vf total[ROWS][N];
  float offset[ROWS][N] = {};
  for (int r = 0; r < ROWS; ++r) for (int t = 0; t < n; ++t) total[r][t] = vf{};
  for (int64_t g = 0; g < groups; ++g) {
    vf a[ROWS][N];
    for (int r = 0; r < ROWS; ++r) for (int t = 0; t < n; ++t) a[r][t] = vf{};
    const int64_t begin = g * group, end = begin + group;
    if (bits == 8) {
      for (int64_t i = begin; i < end; i += EF_VEC) {
        vf wr[ROWS];
        for (int r = 0; r < ROWS; ++r) wr[r] = r < rows ? bytes(codes + r * stride + i) : vf{};
        for (int t = 0; t < n; ++t) {
          const vf xv = load(xs + t * in + i);
          for (int r = 0; r < ROWS; ++r) a[r][t] += wr[r] * xv;
        }
      }
    } else {
      for (int64_t i = begin; i < end; i += 2 * EF_VEC) {
        vf lo[ROWS], hi[ROWS];
        for (int r = 0; r < ROWS; ++r) {
          if (r < rows) nibbles(codes + r * stride + i / 2, lo[r], hi[r]);
          else lo[r] = hi[r] = vf{};
        }
        for (int t = 0; t < n; ++t) {
          const vf xe = load(xs + t * in + i), xo = load(xs + t * in + i + EF_VEC);
          for (int r = 0; r < ROWS; ++r) a[r][t] += lo[r] * xe + hi[r] * xo;
        }
      }
    }
    // scale the group's partial sums as vectors: one horizontal sum per row and token at the end
    for (int r = 0; r < rows; ++r)
      for (int t = 0; t < n; ++t) {
        total[r][t] += scale[r * groups + g] * a[r][t];
        offset[r][t] += gbias[r * groups + g] * xsum[t * groups + g];
      }
  }
  for (int r = 0; r < rows; ++r) for (int t = 0; t < n; ++t) acc[r * MAXN + t] = hsum(total[r][t]) + offset[r][t];
}


#if defined(__AVX2__)
// The integer path (AVX2): the activations of each token become int16 with one scale per token (15 bits of
// precision, still 16-bit activations), codes are widened to int16, and _mm256_madd_epi16 multiplies 16 pairs
// and adds neighbours into int32 lanes: about half the instructions of widening codes to float. int32 sums
// are flushed to float every 64 inputs (64 * 255 * 32767 < 2^31). int4 inputs are reordered per block of 32
// (the block's 16 even inputs, then its 16 odd ones) to meet the low and high nibbles of 16 bytes.
static const int64_t INT_CHUNK = 64;

template <int N, int BITS>
static void packed_tile_int(const int16_t* xq, const float* xscale, const float* xsum, int64_t in, int64_t group,
                            const uint8_t* codes, int64_t stride, const float* scale, const float* gbias,
                            int64_t rows, float* acc) {
  const int64_t groups = in / group, chunk = group < INT_CHUNK ? group : INT_CHUNK;
  __m256 total[ROWS][N];
  float offset[ROWS][N] = {};
  for (int r = 0; r < ROWS; ++r) for (int t = 0; t < N; ++t) total[r][t] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256 part[ROWS][N];
    for (int r = 0; r < ROWS; ++r) for (int t = 0; t < N; ++t) part[r][t] = _mm256_setzero_ps();
    for (int64_t c = g * group; c < (g + 1) * group; c += chunk) {
      const int64_t stop = c + chunk < (g + 1) * group ? c + chunk : (g + 1) * group;
      __m256i a[ROWS][N];
      for (int r = 0; r < ROWS; ++r) for (int t = 0; t < N; ++t) a[r][t] = _mm256_setzero_si256();
      if (BITS == 8) {
        for (int64_t i = c; i < stop; i += 16) {
          __m256i w[ROWS];
          for (int r = 0; r < ROWS; ++r)
            w[r] = r < rows ? _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(codes + r * stride + i)))
                            : _mm256_setzero_si256();
          for (int t = 0; t < N; ++t) {
            const __m256i xv = _mm256_loadu_si256((const __m256i*)(xq + t * in + i));
            for (int r = 0; r < ROWS; ++r) a[r][t] = _mm256_add_epi32(a[r][t], _mm256_madd_epi16(w[r], xv));
          }
        }
      } else {
        const __m128i mask = _mm_set1_epi8(15);
        for (int64_t i = c; i < stop; i += 32) {
          __m256i lo[ROWS], hi[ROWS];
          for (int r = 0; r < ROWS; ++r) {
            const __m128i b = r < rows ? _mm_loadu_si128((const __m128i*)(codes + r * stride + i / 2))
                                       : _mm_setzero_si128();
            lo[r] = _mm256_cvtepu8_epi16(_mm_and_si128(b, mask));
            hi[r] = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(b, 4), mask));
          }
          for (int t = 0; t < N; ++t) {
            const __m256i xe = _mm256_loadu_si256((const __m256i*)(xq + t * in + i));
            const __m256i xo = _mm256_loadu_si256((const __m256i*)(xq + t * in + i + 16));
            for (int r = 0; r < ROWS; ++r)
              a[r][t] = _mm256_add_epi32(a[r][t], _mm256_add_epi32(_mm256_madd_epi16(lo[r], xe),
                                                                    _mm256_madd_epi16(hi[r], xo)));
          }
        }
      }
      for (int r = 0; r < ROWS; ++r)
        for (int t = 0; t < N; ++t) part[r][t] = _mm256_add_ps(part[r][t], _mm256_cvtepi32_ps(a[r][t]));
    }
    for (int r = 0; r < rows; ++r)
      for (int t = 0; t < N; ++t) {
        total[r][t] = _mm256_fmadd_ps(_mm256_set1_ps(scale[r * groups + g]), part[r][t], total[r][t]);
        offset[r][t] += gbias[r * groups + g] * xsum[t * groups + g];
      }
  }
  for (int r = 0; r < rows; ++r)
    for (int t = 0; t < N; ++t) {
      __m128 q = _mm_add_ps(_mm256_castps256_ps128(total[r][t]), _mm256_extractf128_ps(total[r][t], 1));
      q = _mm_hadd_ps(q, q);
      q = _mm_hadd_ps(q, q);
      acc[r * MAXN + t] = _mm_cvtss_f32(q) * xscale[t] + offset[r][t];
    }
}
#endif

#if defined(__AVX2__)
// The one-token decode case of packed_tile_int on ROWS rows (anywhere: one pointer each): the int32 sums of each
// chunk of at most INT_CHUNK inputs are scaled by their group's scale straight into the float totals, so
// accumulators, totals, codes and the input stay within the 16 vector registers (the general kernel keeps
// per-group partial sums too, and spills). Any group size: a per-channel group is INT_CHUNK-input chunks.
template <int BITS, bool CHUNKED>
static void packed_tile_int_one(const int16_t* xq, const float* xscale, const float* xsum, int64_t in, int64_t group,
                                const uint8_t* const* codes, const float* const* scale, const float* const* gbias,
                                float* acc) {
  const int64_t groups = in / group;
  __m256 total[ROWS];
  float offset[ROWS] = {};
  for (int r = 0; r < ROWS; ++r) total[r] = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi16(15);
  // int32 sums of inputs [from, to) into a[r], then scaled by group g's scale into the totals
  auto add_chunk = [&](int64_t g, int64_t from, int64_t to) {
    __m256i a[ROWS];
    for (int r = 0; r < ROWS; ++r) a[r] = _mm256_setzero_si256();
    if (BITS == 8) {
      for (int64_t i = from; i < to; i += 16) {
        const __m256i xv = _mm256_loadu_si256((const __m256i*)(xq + i));
        for (int r = 0; r < ROWS; ++r) {
          const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(codes[r] + i)));
          a[r] = _mm256_add_epi32(a[r], _mm256_madd_epi16(w, xv));
        }
      }
    } else {
      for (int64_t i = from; i < to; i += 32) {
        const __m256i xe = _mm256_loadu_si256((const __m256i*)(xq + i));
        const __m256i xo = _mm256_loadu_si256((const __m256i*)(xq + i + 16));
        for (int r = 0; r < ROWS; ++r) {  // 16 bytes widened once; each 16-bit lane splits into its two nibbles
          const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(codes[r] + i / 2)));
          const __m256i lo = _mm256_and_si256(b, low), hi = _mm256_srli_epi16(b, 4);
          a[r] = _mm256_add_epi32(a[r], _mm256_add_epi32(_mm256_madd_epi16(lo, xe), _mm256_madd_epi16(hi, xo)));
        }
      }
    }
    for (int r = 0; r < ROWS; ++r)
      total[r] = _mm256_fmadd_ps(_mm256_set1_ps(scale[r][g]), _mm256_cvtepi32_ps(a[r]), total[r]);
  };
  for (int64_t g = 0; g < groups; ++g) {
    if constexpr (CHUNKED) {  // a group above INT_CHUNK inputs (per channel, say): its chunks' sums one by one
      for (int64_t c = g * group; c < (g + 1) * group; c += INT_CHUNK)
        add_chunk(g, c, c + INT_CHUNK < (g + 1) * group ? c + INT_CHUNK : (g + 1) * group);
    } else {
      add_chunk(g, g * group, (g + 1) * group);
    }
    for (int r = 0; r < ROWS; ++r) offset[r] += gbias[r][g] * xsum[g];
  }
  for (int r = 0; r < ROWS; ++r) {
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(total[r]), _mm256_extractf128_ps(total[r], 1));
    q = _mm_hadd_ps(q, q);
    q = _mm_hadd_ps(q, q);
    acc[r * MAXN] = _mm_cvtss_f32(q) * xscale[0] + offset[r];
  }
}
#endif

// Prepare the input of ef_linear_packed: `xs` (n x in: float32, reordered for int4 per block of 2 * EF_VEC; or,
// on the integer path, int16 reordered per block of 32, with one scale per token in `xscale`) and `xsum`
// (n x in/group, float32 sums of the original inputs).
extern "C" int ef_packed_integer_path() {
#if defined(__AVX2__)
  return 1;
#else
  return 0;
#endif
}

extern "C" void ef_packed_input(const float* x, int64_t n, int64_t in, int bits, int64_t group, void* xs, float* xsum,
                                float* xscale) {
  const int64_t groups = in / group;
  const int64_t block = ef_packed_integer_path() ? 32 : 2 * EF_VEC, half = block / 2;
  for (int64_t t = 0; t < n; ++t) {
    const float* row = x + t * in;
    float top = 0.f;
    for (int64_t i = 0; i < in; ++i) top = std::fabs(row[i]) > top ? std::fabs(row[i]) : top;
    const float step = top > 0.f ? top / 32767.f : 1.f;
    xscale[t] = step;
    for (int64_t b = 0; b < in; b += block)
      for (int64_t k = 0; k < block && b + k < in; ++k) {
        // the position of input b + k in the kernel's order
        const int64_t to = bits == 4 ? b + (k % 2) * half + k / 2 : b + k;
        if (ef_packed_integer_path())
          ((int16_t*)xs)[t * in + to] = (int16_t)std::lrint(row[b + k] / step);
        else
          ((float*)xs)[t * in + to] = row[b + k];
      }
    for (int64_t g = 0; g < groups; ++g) {
      float s = 0.f;
      for (int64_t i = g * group; i < (g + 1) * group; ++i) s += row[i];
      xsum[t * groups + g] = s;
    }
  }
}

#if defined(__AVX2__)
// One token on the integer path: the register-resident tile over ROWS rows
// that lie far apart (row i of each of ROWS equal parts of a thread's share of all `count` weights' rows), so each
// row is its own sequential stream; the rows left over take the general tile one at a time. Adjacent rows, read
// together, interleave their streams inside the same pages (see dense_far).
template <int BITS, bool CHUNKED>
static void linear_packed_far_one(const int16_t* xq, const float* xsum, const float* xscale, int64_t in,
                                  int64_t group, int64_t count, const uint8_t* const* codes,
                                  const float* const* scale, const float* const* gbias, const int64_t* out,
                                  const float* const* bias, float* const* y) {
  const int64_t stride = in * BITS / 8, groups = in / group;
  int64_t first[16 + 1] = {0};
  for (int64_t j = 0; j < count; ++j) first[j + 1] = first[j] + out[j];
  const int64_t rows = first[count];
  auto locate = [&](int64_t r, int64_t& j) { while (r >= first[j + 1]) ++j; return r - first[j]; };
  auto store = [&](int64_t j, int64_t r, float value) { y[j][r] = value + (bias[j] ? bias[j][r] : 0.f); };
  #pragma omp parallel
  {
    const int64_t threads = omp_get_num_threads(), id = omp_get_thread_num();
    const int64_t lo = rows * id / threads, hi = rows * (id + 1) / threads, part = (hi - lo) / ROWS;
    int64_t weight[ROWS] = {}, local[ROWS];
    const uint8_t* row_codes[ROWS];
    const float *row_scale[ROWS], *row_gbias[ROWS];
    float acc[ROWS * MAXN];
    for (int64_t i = 0; i < part; ++i) {
      for (int r = 0; r < ROWS; ++r) {
        local[r] = locate(lo + r * part + i, weight[r]);
        row_codes[r] = codes[weight[r]] + local[r] * stride;
        row_scale[r] = scale[weight[r]] + local[r] * groups;
        row_gbias[r] = gbias[weight[r]] + local[r] * groups;
      }
      packed_tile_int_one<BITS, CHUNKED>(xq, xscale, xsum, in, group, row_codes, row_scale, row_gbias, acc);
      for (int r = 0; r < ROWS; ++r) store(weight[r], local[r], acc[r * MAXN]);
    }
    int64_t j = 0;
    for (int64_t r = lo + ROWS * part; r < hi; ++r) {
      const int64_t at = locate(r, j);
      packed_tile_int<1, BITS>(xq, xscale, xsum, in, group, codes[j] + at * stride, stride, scale[j] + at * groups,
                               gbias[j] + at * groups, 1, acc);
      store(j, at, acc[0]);
    }
  }
}
#endif

extern "C" void ef_linear_packed(const void* xs, const float* xsum, const float* xscale, int64_t n, int64_t in,
                                 int bits, int64_t group, int64_t count, const uint8_t* const* codes,
                                 const float* const* scale, const float* const* gbias, const int64_t* out,
                                 const float* const* bias, float* const* y) {
  const int64_t stride = in * bits / 8, groups = in / group;
#if defined(__AVX2__)
  if (n == 1) {  // one instantiation per case, so each keeps its tile inlined
    const int16_t* xq = (const int16_t*)xs;
    if (bits == 8 && group > INT_CHUNK)
      linear_packed_far_one<8, true>(xq, xsum, xscale, in, group, count, codes, scale, gbias, out, bias, y);
    else if (bits == 8)
      linear_packed_far_one<8, false>(xq, xsum, xscale, in, group, count, codes, scale, gbias, out, bias, y);
    else if (group > INT_CHUNK)
      linear_packed_far_one<4, true>(xq, xsum, xscale, in, group, count, codes, scale, gbias, out, bias, y);
    else
      linear_packed_far_one<4, false>(xq, xsum, xscale, in, group, count, codes, scale, gbias, out, bias, y);
    return;
  }
#endif
  for_each_tile(n, count, out, bias, y, [&](int64_t j, int64_t row, int64_t rows, float* acc) {
    dispatch_tokens(n, [&](auto N) {
#if defined(__AVX2__)
      if (bits == 8)
        packed_tile_int<N.value, 8>((const int16_t*)xs, xscale, xsum, in, group, codes[j] + row * stride, stride,
                                    scale[j] + row * groups, gbias[j] + row * groups, rows, acc);
      else
        packed_tile_int<N.value, 4>((const int16_t*)xs, xscale, xsum, in, group, codes[j] + row * stride, stride,
                                    scale[j] + row * groups, gbias[j] + row * groups, rows, acc);
      return;
#endif
      const float* xf = (const float*)xs;
      if (bits == 8)
        packed_tile<N.value, 8>(xf, xsum, in, group, codes[j] + row * stride, stride, scale[j] + row * groups,
                                gbias[j] + row * groups, rows, acc);
      else
        packed_tile<N.value, 4>(xf, xsum, in, group, codes[j] + row * stride, stride, scale[j] + row * groups,
                                gbias[j] + row * groups, rows, acc);
    });
  });
}

// Dense float32 [out, in] weight of a packed one (for a prefill GEMM): w = code * scale + gbias.
#if defined(__AVX2__) || defined(__AVX512F__)
// 16 codes in input order -> w, stored at dst
static inline void store16(__m128i codes, float s, float b, float* dst) {
  const vf scale = vf{} + s, shift = vf{} + b;
#if defined(__AVX512F__)
  const vf w = widen(codes) * scale + shift;
  std::memcpy(dst, &w, sizeof w);
#else
  const vf lo = widen(codes) * scale + shift, hi = widen(_mm_srli_si128(codes, 8)) * scale + shift;
  std::memcpy(dst, &lo, sizeof lo);
  std::memcpy(dst + 8, &hi, sizeof hi);
#endif
}
#endif

static void dequantize_row(const uint8_t* row, const float* scale, const float* gbias, int64_t in, int bits,
                           int64_t group, float* dst) {
  for (int64_t g = 0; g < in / group; ++g) {
    const float s = scale[g], b = gbias[g];
    int64_t i = g * group;
#if defined(__AVX2__) || defined(__AVX512F__)
    for (; i + 16 <= (g + 1) * group; i += 16) {
      __m128i codes;
      if (bits == 8) {
        codes = _mm_loadu_si128((const __m128i*)(row + i));
      } else {  // 8 bytes -> 16 nibbles, the low nibble first
        const __m128i packed = _mm_loadl_epi64((const __m128i*)(row + i / 2)), mask = _mm_set1_epi8(15);
        codes = _mm_unpacklo_epi8(_mm_and_si128(packed, mask), _mm_and_si128(_mm_srli_epi16(packed, 4), mask));
      }
      store16(codes, s, b, dst + i);
    }
#endif
    for (; i < (g + 1) * group; ++i) {
      const int code = bits == 8 ? row[i] : (row[i / 2] >> (4 * (i & 1))) & 15;
      dst[i] = code * s + b;
    }
  }
}

extern "C" void ef_dequantize(const uint8_t* codes, const float* scale, const float* gbias, int64_t out, int64_t in,
                              int bits, int64_t group, float* w) {
  const int64_t stride = in * bits / 8, groups = in / group;
  #pragma omp parallel for schedule(static)
  for (int64_t o = 0; o < out; ++o)
    dequantize_row(codes + o * stride, scale + o * groups, gbias + o * groups, in, bits, group, w + o * in);
}

// ---------------------------------------------------------------- norms and activations

// h = x + residual (in place into `residual` when given, else h = x); out = h * rstd(h) * (weight + offset)
extern "C" void ef_add_rmsnorm(const float* x, float* residual, int64_t n, int64_t dim, const float* weight, float eps,
                    float offset, float* out) {
  for (int64_t t = 0; t < n; ++t) {
    float* h = residual ? residual + t * dim : nullptr;
    const float* src = x + t * dim;
    // the sum of squares in two vector sums (one scalar double chain before; a SmolLM2 step's norms take 0.10-0.15 ms
    // of ~20 in the engine table's profiles either way)
    vf sq[2] = {};
    int64_t i = 0;
    for (; i + 2 * EF_VEC <= dim; i += 2 * EF_VEC)
      for (int u = 0; u < 2; ++u) {
        vf v = load(src + i + u * EF_VEC);
        if (h) {
          v += load(h + i + u * EF_VEC);
          std::memcpy(h + i + u * EF_VEC, &v, sizeof v);
        }
        sq[u] += v * v;
      }
    double ss = hsum(sq[0] + sq[1]);
    for (; i < dim; ++i) {
      const float v = h ? h[i] + src[i] : src[i];
      if (h) h[i] = v;
      ss += (double)v * v;
    }
    const float rstd = 1.0f / std::sqrt((float)(ss / dim) + eps);
    const float* v = h ? h : src;
    for (i = 0; i < dim; ++i) out[t * dim + i] = v[i] * rstd * (weight[i] + offset);
  }
}

// gate <- act(gate) * up; act 0 = SiLU, 1 = GELU (tanh approximation)
extern "C" void ef_gated_act(float* gate, const float* up, int64_t size, int act) {
  const int64_t body = act == 0 ? size - size % EF_VEC : 0;
  #pragma omp parallel for schedule(static) if (size > 16384)
  for (int64_t i = 0; i < body; i += EF_VEC) {  // SiLU as vectors
    const vf g = load(gate + i), a = g / (1.f + vexp(-g)) * load(up + i);
    std::memcpy(gate + i, &a, sizeof a);
  }
  #pragma omp parallel for schedule(static) if (size - body > 4096)
  for (int64_t i = body; i < size; ++i) {
    const float g = gate[i];
    float a;
    if (act == 0) a = g / (1.0f + std::exp(-g));
    else a = 0.5f * g * (1.0f + std::tanh(0.7978845608028654f * (g + 0.044715f * g * g * g)));
    gate[i] = a * up[i];
  }
}

// ---------------------------------------------------------------- rotary + KV write + attention

// Split-KV attention (flash-decoding): the keys of each (row, KV head) are cut into chunks so that both cores
// have work at batch 1; a task reads its chunk of keys and values once for every query head of the KV head's
// group, keeping (max, sum of exp, weighted values) per head; the chunks are then merged per head.
static const int MAX_GROUP_HEADS = 16;

struct Partial { float top, denom; };

// The scores of a KV head's group are computed for G <= 3 query heads at a time, so every key vector is loaded once
// for all G of them and a block of KB keys has G * KB independent sums (one head at a time: 8 sums of 8 dependent
// FMAs, ~4 ns per key and head here, three times the loop's FMA bound; G = 3 took the attention 0.96x as long with
// the keys cold, as in a decode step, and 0.78-0.91x warm at 2k-8k keys).
static const int MAX_TOGETHER = 3;

// p_g[j] = qs_g . key_j for G heads (qs: G rows of dim floats), KB keys per block
template <int G>
static void group_scores(const float* qs, const float* keys, int64_t len, int64_t dim, float* const* p) {
  constexpr int KB = G == 1 ? 8 : 4;
  const int64_t chunks = dim / EF_VEC;
  int64_t j = 0;
  for (; j + KB <= len; j += KB) {
    vf a[G][KB];
    for (int g = 0; g < G; ++g)
      for (int k = 0; k < KB; ++k) a[g][k] = vf{};
    for (int64_t i = 0; i < chunks; ++i) {
      vf qv[G];
      for (int g = 0; g < G; ++g) qv[g] = load(qs + g * dim + i * EF_VEC);
      for (int k = 0; k < KB; ++k) {
        const vf kv = load(keys + (j + k) * dim + i * EF_VEC);
        for (int g = 0; g < G; ++g) a[g][k] += qv[g] * kv;
      }
    }
    for (int g = 0; g < G; ++g) {
      if constexpr (KB == 8) hsum8(a[g], p[g] + j);
      else hsums<KB>(a[g], p[g] + j);
    }
  }
  for (; j < len; ++j)
    for (int g = 0; g < G; ++g) {
      vf a{};
      for (int64_t i = 0; i < chunks; ++i) a += load(qs + g * dim + i * EF_VEC) * load(keys + j * dim + i * EF_VEC);
      p[g][j] = hsum(a);
    }
}

// out[0 .. W * EF_VEC) = sum_j p[j] * vals[j * dim + 0 .. W * EF_VEC): W, a constant, keeps the sums in registers.
// One head at a time: G heads at once would need G * 8 sums for a row of 64 floats, so the rows would be read in
// parts, which took the attention 1.18x as long with the values cold (as in a decode step).
template <int W>
static inline void weighted_values(const float* p, const float* vals, int64_t len, int64_t dim, float* out) {
  vf o[W];
  for (int i = 0; i < W; ++i) o[i] = vf{};
  for (int64_t j = 0; j < len; ++j) {
    const float w = p[j];
    for (int i = 0; i < W; ++i) o[i] += w * load(vals + j * dim + i * EF_VEC);
  }
  for (int i = 0; i < W; ++i) std::memcpy(out + i * EF_VEC, &o[i], sizeof o[i]);
}

// p[0..len) <- exp(p - max p); returns (max, sum of the exponentials)
static Partial softmax_numerators(float* p, int64_t len) {
  vf tops = vf{} - INFINITY;
  int64_t j = 0;
  for (; j + EF_VEC <= len; j += EF_VEC) {
    const vf v = load(p + j);
    tops = v > tops ? v : tops;
  }
  float top = -INFINITY;
  for (int i = 0; i < EF_VEC; ++i) top = tops[i] > top ? tops[i] : top;
  for (; j < len; ++j) top = p[j] > top ? p[j] : top;
  vf total{};
  for (j = 0; j + EF_VEC <= len; j += EF_VEC) {
    const vf e = vexp(load(p + j) - top);
    std::memcpy(p + j, &e, sizeof e);
    total += e;
  }
  float denom = hsum(total);
  for (; j < len; ++j) {
    p[j] = std::exp(p[j] - top);
    denom += p[j];
  }
  return Partial{top, denom};
}

// G heads' scores, softmax numerators and weighted values over one chunk of keys
template <int G>
static void attend_heads(const float* q, const float* keys, const float* vals, int64_t len, int64_t dim, float scale,
                         float* p, int64_t pstride, Partial* part, float* acc) {
  alignas(64) float scaled[MAX_TOGETHER * 512];  // the queries times the softmax scale (head dim <= 512)
  for (int64_t i = 0; i < G * dim; ++i) scaled[i] = q[i] * scale;
  float* ph[G];
  for (int g = 0; g < G; ++g) ph[g] = p + g * pstride;
  group_scores<G>(scaled, keys, len, dim, ph);
  const int64_t chunks = dim / EF_VEC;
  for (int g = 0; g < G; ++g) {
    part[g] = softmax_numerators(ph[g], len);
    float* out = acc + g * dim;
    for (int64_t i0 = 0; i0 < chunks; i0 += 8) {
      const int64_t width = chunks - i0 < 8 ? chunks - i0 : 8;
      if (width == 8) weighted_values<8>(ph[g], vals + i0 * EF_VEC, len, dim, out + i0 * EF_VEC);
      else if (width == 4) weighted_values<4>(ph[g], vals + i0 * EF_VEC, len, dim, out + i0 * EF_VEC);
      else for (int64_t i = 0; i < width; ++i) weighted_values<1>(ph[g], vals + (i0 + i) * EF_VEC, len, dim,
                                                                     out + (i0 + i) * EF_VEC);
    }
  }
}

static void attend_chunk(const float* q, int64_t heads, const float* keys, const float* vals, int64_t len,
                         int64_t dim, float scale, float* p, int64_t pstride, Partial* part, float* acc) {
  for (int64_t h = 0; h < heads;) {
    const int64_t together = heads - h < MAX_TOGETHER ? heads - h : MAX_TOGETHER;
    const float* qh = q + h * dim;
    float* ph = p + h * pstride;
    if (together == 3) attend_heads<3>(qh, keys, vals, len, dim, scale, ph, pstride, part + h, acc + h * dim);
    else if (together == 2) attend_heads<2>(qh, keys, vals, len, dim, scale, ph, pstride, part + h, acc + h * dim);
    else attend_heads<1>(qh, keys, vals, len, dim, scale, ph, pstride, part + h, acc + h * dim);
    h += together;
  }
}

// q [B, hq, D] over the caches' columns first[b]..last(b); out [B, hq, D]; scratch: B * hq * capacity floats.
// Batch rows (chain = 0): row b attends cache row b up to `slot`. A chain (chain = 1): B consecutive tokens of cache
// row 0, token b at column slot + b, attending up to its own column (causal).
static void attend(const float* q, const float* kcache, const float* vcache, int64_t batch, int64_t hq, int64_t hkv,
                   int64_t dim, int64_t capacity, int64_t slot, int64_t chain, const int64_t* first, float scale,
                   float* out, float* scratch) {
  const int64_t group = hq / hkv;
  int64_t longest = 1;
  auto last = [&](int64_t b) { return slot + (chain ? b : 0); };
  for (int64_t b = 0; b < batch; ++b) longest = last(b) + 1 - first[b] > longest ? last(b) + 1 - first[b] : longest;
  const int64_t wanted = (8 * omp_get_max_threads() + batch * hkv - 1) / (batch * hkv);
  const int64_t splits = wanted < (longest + 15) / 16 ? wanted : (longest + 15) / 16;
  const int64_t chunk = (longest + splits - 1) / splits;
  static thread_local float* merged = nullptr;
  static thread_local int64_t merged_size = 0;
  const int64_t need = batch * hq * splits * (dim + 2);
  if (merged_size < need) {
    delete[] merged;
    merged = new float[need];
    merged_size = need;
  }
  float* parts = merged;
  #pragma omp parallel for schedule(static) collapse(3)
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t kvh = 0; kvh < hkv; ++kvh)
      for (int64_t sp = 0; sp < splits; ++sp) {
        const int64_t lo = first[b] + sp * chunk, hi = lo + chunk < last(b) + 1 ? lo + chunk : last(b) + 1;
        const int64_t row = chain ? 0 : b;
        const int64_t h0 = kvh * group;
        float* acc = parts + ((b * hq + h0) * splits + sp) * (dim + 2);  // per head: dim values, then top, denom
        if (hi <= lo) {
          for (int64_t h = 0; h < group; ++h) acc[h * splits * (dim + 2) + dim] = -INFINITY;
          continue;
        }
        Partial part_here[MAX_GROUP_HEADS];
        float sums_here[MAX_GROUP_HEADS * 512];  // head dim <= 512 (checked in Python)
        std::vector<Partial> part_big;
        std::vector<float> sums_big;
        Partial* part = part_here;
        float* sums = sums_here;
        if (group > MAX_GROUP_HEADS) {
          part_big.resize(group);
          sums_big.resize(group * dim);
          part = part_big.data();
          sums = sums_big.data();
        }
        attend_chunk(q + (b * hq + h0) * dim, group, kcache + ((row * hkv + kvh) * capacity + lo) * dim,
                     vcache + ((row * hkv + kvh) * capacity + lo) * dim, hi - lo, dim, scale,
                     scratch + (b * hq + h0) * capacity + sp * chunk, capacity, part, sums);
        for (int64_t h = 0; h < group; ++h) {
          float* dst = acc + h * splits * (dim + 2);
          std::memcpy(dst, sums + h * dim, dim * sizeof(float));
          dst[dim] = part[h].top;
          dst[dim + 1] = part[h].denom;
        }
      }
  for (int64_t bh = 0; bh < batch * hq; ++bh) {
    const float* head = parts + bh * splits * (dim + 2);
    float top = -INFINITY;
    for (int64_t sp = 0; sp < splits; ++sp) top = head[sp * (dim + 2) + dim] > top ? head[sp * (dim + 2) + dim] : top;
    float denom = 0.f;
    float* o = out + bh * dim;
    for (int64_t i = 0; i < dim; ++i) o[i] = 0.f;
    for (int64_t sp = 0; sp < splits; ++sp) {
      const float* part = head + sp * (dim + 2);
      if (part[dim] == -INFINITY) continue;
      const float weight = std::exp(part[dim] - top);
      denom += weight * part[dim + 1];
      for (int64_t i = 0; i < dim; ++i) o[i] += weight * part[i];
    }
    for (int64_t i = 0; i < dim; ++i) o[i] /= denom;
  }
}

// One new token per batch row. q [B, Hq, D], k/v [B, Hkv, D] (projected, normed); cos/sin [B, D];
// caches [B, Hkv, T, D]. Rotates q and k (HF rotate-half convention), writes k and v at column `slot`,
// then attends q over columns first[b]..slot of row b. out [B, Hq, D].
static void rotate_write_attend(float* q, float* k, const float* v, const float* cos, const float* sin,
                         float* kcache, float* vcache, int64_t batch, int64_t hq, int64_t hkv, int64_t dim,
                         int64_t capacity, int64_t slot, int64_t chain, const int64_t* first, float scale, float* out,
                         float* scratch) {
  const int64_t half = dim / 2;
  for (int64_t b = 0; b < batch; ++b) {
    const float* c = cos + b * dim;
    const float* s = sin + b * dim;
    for (int64_t h = 0; h < hq + hkv; ++h) {
      float* x = h < hq ? q + (b * hq + h) * dim : k + (b * hkv + h - hq) * dim;
      float tmp[512];
      for (int64_t i = 0; i < half; ++i) {
        tmp[i] = x[i] * c[i] - x[i + half] * s[i];
        tmp[i + half] = x[i + half] * c[i + half] + x[i] * s[i + half];
      }
      std::memcpy(x, tmp, dim * sizeof(float));
    }
    const int64_t row = chain ? 0 : b, column = slot + (chain ? b : 0);
    for (int64_t h = 0; h < hkv; ++h) {
      std::memcpy(kcache + ((row * hkv + h) * capacity + column) * dim, k + (b * hkv + h) * dim, dim * sizeof(float));
      std::memcpy(vcache + ((row * hkv + h) * capacity + column) * dim, v + (b * hkv + h) * dim, dim * sizeof(float));
    }
  }
  attend(q, kcache, vcache, batch, hq, hkv, dim, capacity, slot, chain, first, scale, out, scratch);
}

extern "C" void ef_decode_attention(float* q, float* k, const float* v, const float* cos, const float* sin,
                                    float* kcache, float* vcache, int64_t batch, int64_t hq, int64_t hkv, int64_t dim,
                                    int64_t capacity, int64_t slot, const int64_t* first, float scale, float* out,
                                    float* scratch) {
  rotate_write_attend(q, k, v, cos, sin, kcache, vcache, batch, hq, hkv, dim, capacity, slot, 0, first, scale, out,
                      scratch);
}

// ---------------------------------------------------------------- one decode step over every layer
// The calls of a decoder block (norms, fused projections, attention, gated MLP) for every layer in one native
// call: no Python, tensor allocation or ctypes conversion between them. Mirrors NativeStep's per-call loop.

struct EfGroup {  // weights sharing one input: bits 32 = dense float32 [out, in], 4 / 8 = packed codes
  int64_t count, in, bits, group;
  const void* weight[3];
  const float* scale[3];
  const float* gbias[3];
  const float* bias[3];
  int64_t out[3];
};
struct EfNorm { const float* weight; float eps, offset; };  // weight null: the block has no such norm
struct EfLayer {
  EfGroup qkv, o, gate_up, down;
  EfNorm input, post_attention, pre_ffn, post_ffn, q_norm, k_norm;
  int64_t kind;  // attention type: index of its rotary tables and first attended columns
  float scale;
};
struct EfStep {
  int64_t hidden, hq, hkv, dim, inter, act, sandwich;
  const EfLayer* layers;
  EfNorm final_norm;
  // scratch for MAXN rows: x/o/down [hidden], q/attn [hq*dim], k/v [hkv*dim], gate/up [inter];
  // packed inputs: xs [largest in], xsum [largest in / smallest group], xscale [1]
  float *x, *q, *k, *v, *attn, *o, *gate, *up, *down, *xsum, *xscale;
  void* xs;
};
enum { T_NORMS, T_MATMULS, T_ATTENTION, T_ACTIVATION, T_INPUTS, T_HEAD };

static void run_group(const EfStep* s, const EfGroup& g, const float* x, int64_t n, float* y0, float* y1, float* y2) {
  float* const y[3] = {y0, y1, y2};
  if (g.bits == 32) {
    ef_linear_f32(x, n, g.in, g.count, (const float* const*)g.weight, g.out, g.bias, y);
  } else {
    ef_packed_input(x, n, g.in, (int)g.bits, g.group, s->xs, s->xsum, s->xscale);
    ef_linear_packed(s->xs, s->xsum, s->xscale, n, g.in, (int)g.bits, g.group, g.count,
                     (const uint8_t* const*)g.weight, g.scale, g.gbias, g.out, g.bias, y);
  }
}

static void norm(const EfNorm& m, const float* x, float* residual, int64_t rows, int64_t dim, float* out) {
  ef_add_rmsnorm(x, residual, rows, dim, m.weight, m.eps, m.offset, out);
}

// hidden [n, hidden]: the embedded tokens in, the residual stream after the last layer out; out [n, hidden]: its
// final norm. Layers `order[0..count)`; cos/sin [n, dim] and first [n] indexed by a layer's kind; the caches
// [layers, n, hkv, capacity, dim] (chain = 0: n rows of one token at column `slot`) or [layers, 1, hkv, capacity,
// dim] (chain = 1: n consecutive tokens of one row from column `slot`, causal); probs: n * hq * capacity floats;
// timers (or null): seconds per kind of call, added.
extern "C" void ef_decode_step(const EfStep* s, const int64_t* order, int64_t count, int64_t n, float* hidden,
                               const float* const* cos, const float* const* sin, const int64_t* const* first,
                               float* kcache, float* vcache, int64_t capacity, int64_t slot, int64_t chain,
                               float* probs, float* out, double* timers) {
  const int64_t per_layer = (chain ? 1 : n) * s->hkv * capacity * s->dim;
  double mark = timers ? omp_get_wtime() : 0.0;
  auto lap = [&](int kind) {
    if (!timers) return;
    const double now = omp_get_wtime();
    timers[kind] += now - mark;
    mark = now;
  };
  bool pending = false;  // the last block's output (s->down) is not yet added to hidden
  for (int64_t c = 0; c < count; ++c) {
    const EfLayer& l = s->layers[order[c]];
    norm(l.input, pending ? s->down : hidden, pending ? hidden : nullptr, n, s->hidden, s->x);
    lap(T_NORMS);
    run_group(s, l.qkv, s->x, n, s->q, s->k, s->v);
    lap(T_MATMULS);
    if (l.q_norm.weight) {
      norm(l.q_norm, s->q, nullptr, n * s->hq, s->dim, s->q);
      norm(l.k_norm, s->k, nullptr, n * s->hkv, s->dim, s->k);
      lap(T_NORMS);
    }
    rotate_write_attend(s->q, s->k, s->v, cos[l.kind], sin[l.kind], kcache + order[c] * per_layer,
                        vcache + order[c] * per_layer, n, s->hq, s->hkv, s->dim, capacity, slot, chain, first[l.kind],
                        l.scale, s->attn, probs);
    lap(T_ATTENTION);
    run_group(s, l.o, s->attn, n, s->o, nullptr, nullptr);
    lap(T_MATMULS);
    if (s->sandwich) {
      norm(l.post_attention, s->o, nullptr, n, s->hidden, s->o);
      norm(l.pre_ffn, s->o, hidden, n, s->hidden, s->x);
    } else {
      norm(l.post_attention, s->o, hidden, n, s->hidden, s->x);
    }
    lap(T_NORMS);
    run_group(s, l.gate_up, s->x, n, s->gate, s->up, nullptr);
    lap(T_MATMULS);
    ef_gated_act(s->gate, s->up, n * s->inter, (int)s->act);
    lap(T_ACTIVATION);
    run_group(s, l.down, s->gate, n, s->down, nullptr, nullptr);
    lap(T_MATMULS);
    if (s->sandwich) {
      norm(l.post_ffn, s->down, nullptr, n, s->hidden, s->down);
      lap(T_NORMS);
    }
    pending = true;
  }
  norm(s->final_norm, pending ? s->down : hidden, pending ? hidden : nullptr, n, s->hidden, out);
  lap(T_NORMS);
}

// ---------------------------------------------------------------- a whole one-token step in one call
// What ef_decode_tokens gathers itself for n rows of one token each (instead of a dozen torch ops in Python): the
// embedding rows (times the model's embedding scale), each row's rotary row and first attended column per attention
// kind, and the output head after the final norm.
static const int MAX_KINDS = 4;
struct EfInputs {
  const float* embedding;  // [vocab, hidden] float32
  int64_t vocab;
  float embed_scale;
  int64_t kinds;
  const float* cos[MAX_KINDS];  // per kind: [rope_rows, dim] (row p: position p)
  const float* sin[MAX_KINDS];
  int64_t rope_rows;
  int64_t window[MAX_KINDS];  // per kind: its sliding window, 0 for full attention
  EfGroup head;
  // scratch for MAXN rows
  float *hidden, *final, *cos_rows, *sin_rows;  // [MAXN, hidden] x2, [kinds, MAXN, dim] x2
  int64_t* first;  // [kinds, MAXN]
};

// tokens [n], pad [n] (each row's left padding): every row's token at column `slot`. Returns 0, or 1 when a token is
// outside the vocabulary, 2 when a position is past the rotary tables (nothing was run or written then).
extern "C" int ef_decode_tokens(const EfStep* s, const EfInputs* in, const int64_t* order, int64_t count, int64_t n,
                                const int64_t* tokens, const int64_t* pad, float* kcache, float* vcache,
                                int64_t capacity, int64_t slot, float* probs, float* logits, double* timers) {
  const double started = timers ? omp_get_wtime() : 0.0;
  for (int64_t b = 0; b < n; ++b) {
    if (tokens[b] < 0 || tokens[b] >= in->vocab) return 1;
    if (slot - pad[b] < 0 || slot - pad[b] >= in->rope_rows) return 2;
  }
  const float* cos[MAX_KINDS];
  const float* sin[MAX_KINDS];
  const int64_t* first[MAX_KINDS];
  for (int64_t b = 0; b < n; ++b) {
    const float* row = in->embedding + tokens[b] * s->hidden;
    for (int64_t i = 0; i < s->hidden; ++i) in->hidden[b * s->hidden + i] = row[i] * in->embed_scale;
  }
  for (int64_t k = 0; k < in->kinds; ++k) {
    float* c = in->cos_rows + k * MAXN * s->dim;
    float* sn = in->sin_rows + k * MAXN * s->dim;
    int64_t* f = in->first + k * MAXN;
    for (int64_t b = 0; b < n; ++b) {
      const int64_t position = slot - pad[b];
      std::memcpy(c + b * s->dim, in->cos[k] + position * s->dim, s->dim * sizeof(float));
      std::memcpy(sn + b * s->dim, in->sin[k] + position * s->dim, s->dim * sizeof(float));
      // a query at column c sees the keys after c - window
      const int64_t windowed = in->window[k] ? slot - in->window[k] + 1 : 0;
      f[b] = pad[b] > windowed ? pad[b] : windowed;
    }
    cos[k] = c;
    sin[k] = sn;
    first[k] = f;
  }
  if (timers) timers[T_INPUTS] += omp_get_wtime() - started;
  ef_decode_step(s, order, count, n, in->hidden, cos, sin, first, kcache, vcache, capacity, slot, 0, probs, in->final,
                 timers);
  const double head_started = timers ? omp_get_wtime() : 0.0;
  run_group(s, in->head, in->final, n, logits, nullptr, nullptr);
  if (timers) timers[T_HEAD] += omp_get_wtime() - head_started;
  return 0;
}

// out[r] = the first index of the largest of x[r, 0..cols) (a NaN counts as largest, as torch.argmax has it):
// one vector pass for the maximum and any NaN, then a vector scan for the first index holding it
typedef int32_t vi __attribute__((vector_size(EF_VEC * 4)));
static inline bool any(vi m) {
#if EF_VEC == 8 && defined(__AVX2__)
  return !_mm256_testz_si256((__m256i)m, (__m256i)m);
#elif EF_VEC == 16 && defined(__AVX512F__)
  return _mm512_test_epi32_mask((__m512i)m, (__m512i)m) != 0;
#else
  for (int k = 0; k < EF_VEC; ++k)
    if (m[k]) return true;
  return false;
#endif
}
static int64_t first_where(const float* p, int64_t cols, bool nan, float m) {
  int64_t i = 0;
  for (; i + EF_VEC <= cols; i += EF_VEC) {
    const vf v = load(p + i);
    if (any(nan ? v != v : v == m)) break;
  }
  for (; i < cols; ++i)
    if (nan ? p[i] != p[i] : p[i] == m) return i;
  return 0;
}
extern "C" void ef_argmax_rows(const float* x, int64_t rows, int64_t cols, int64_t* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* p = x + r * cols;
    vf top = vf{} - INFINITY;
    vi nans = vi{};
    int64_t i = 0;
    for (; i + EF_VEC <= cols; i += EF_VEC) {
      const vf v = load(p + i);
      nans |= v != v;
      top = v > top ? v : top;
    }
    float m = -INFINITY;
    bool nan = any(nans);
    for (int k = 0; k < EF_VEC; ++k) m = top[k] > m ? top[k] : m;
    for (; i < cols; ++i) {
      nan |= p[i] != p[i];
      m = p[i] > m ? p[i] : m;
    }
    out[r] = first_where(p, cols, nan, m);
  }
}
