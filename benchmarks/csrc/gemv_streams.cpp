// How fast a one-token float32 GEMV streams its weights, by read pattern (see benchmarks/gemv_streams.py).
//
// Built with the native kernels' flags and run with OMP_NUM_THREADS threads; prints one line per variant:
// name, median GB/s, median ratio to a one-stream-per-thread vector sum measured in the same round.
#include "../../kernels/csrc/cpu_decode.cpp"
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <utility>
#include <sys/mman.h>

namespace {

constexpr int64_t IN = 576;  // SmolLM2's hidden size

// every thread sums its contiguous share as one stream
double one_stream_sum(const float* p, int64_t n) {
  double total = 0.0;
  #pragma omp parallel for reduction(+ : total) schedule(static)
  for (int64_t block = 0; block < n / (64 * IN); ++block) {
    vf a[4] = {};
    const float* q = p + block * 64 * IN;
    for (int64_t i = 0; i < 64 * IN; i += 4 * EF_VEC)
      for (int u = 0; u < 4; ++u) a[u] += load(q + i + u * EF_VEC);
    total += hsum(a[0] + a[1] + a[2] + a[3]);
  }
  return total;
}

// row r of w [rows, IN] times x, with x held in one register (an upper bound: the loads of x are gone)
float row_times_register(const float* w, vf x) {
  vf a[4] = {};
  for (int64_t i = 0; i < IN; i += 4 * EF_VEC)
    for (int u = 0; u < 4; ++u) a[u] += load(w + i + u * EF_VEC) * x;
  return hsum(a[0] + a[1] + a[2] + a[3]);
}

// two adjacent rows at once, x loaded once for both
void adjacent_pair(const float* x, const float* w, float* y) {
  vf a0[4] = {}, a1[4] = {};
  for (int64_t i = 0; i < IN; i += 4 * EF_VEC)
    for (int u = 0; u < 4; ++u) {
      const vf xv = load(x + i + u * EF_VEC);
      a0[u] += load(w + i + u * EF_VEC) * xv;
      a1[u] += load(w + IN + i + u * EF_VEC) * xv;
    }
  y[0] = hsum(a0[0] + a0[1] + a0[2] + a0[3]);
  y[1] = hsum(a1[0] + a1[1] + a1[2] + a1[3]);
}

// S far-apart rows at once (the S parts of each thread's share), the dense_far kernel of cpu_decode.cpp
template <int S>
void far_rows(const float* x, const float* w, int64_t rows, float* y) {
  #pragma omp parallel
  {
    const int64_t threads = omp_get_num_threads(), id = omp_get_thread_num();
    const int64_t lo = rows * id / threads, hi = rows * (id + 1) / threads, part = (hi - lo) / S;
    float sums[1][S];
    RowCursor at[S];
    for (int64_t i = 0; i < part; ++i) {
      for (int k = 0; k < S; ++k) at[k] = RowCursor{0, lo + k * part + i, w + (lo + k * part + i) * IN};
      dense_far<S, 1>(x, IN, at, sums);
      for (int k = 0; k < S; ++k) y[lo + k * part + i] = sums[0][k];
    }
  }
}

}  // namespace

// n floats, first touched by the threads that read them; huge: 2 MiB-aligned and advised MADV_HUGEPAGE (transparent
// huge pages, as effinfer.kernels.hugepages gives the engine's weights)
float* weights(int64_t n, bool huge) {
  const size_t page = 2 << 20, bytes = (n * 4 + page - 1) / page * page;
  float* w = static_cast<float*>(std::aligned_alloc(page, bytes));
  if (huge) madvise(w, bytes, MADV_HUGEPAGE);
  #pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) w[i] = float(i % 7) * 0.1f;
  return w;
}

int main(int argc, char** argv) {
  const int64_t mib = argc > 1 ? std::atoll(argv[1]) : 256, rounds = argc > 2 ? std::atoll(argv[2]) : 15;
  const int64_t rows = mib * 1024 * 1024 / 4 / (64 * IN) * 64, n = rows * IN;
  std::vector<float> x(IN, 0.5f), y(rows);
  const int64_t out = rows;
  const float* none = nullptr;
  float* yp = y.data();
  volatile double sink = 0.0;
  auto variants_over = [&](const float* wp) {
    return std::vector<std::pair<std::string, std::function<void()>>>{
      {"one stream per thread: vector sum", [=, &sink] { sink = one_stream_sum(wp, n); }},
      {"four streams per thread: ef_stream_read (the probe)", [=, &sink] { sink = ef_stream_read(wp, n); }},
      {"GEMV, one row at a time (dense_row)", [=, &x] {
         #pragma omp parallel for schedule(static)
         for (int64_t r = 0; r < rows; ++r) dense_row<1>(x.data(), IN, wp + r * IN, yp + r);
       }},
      {"dot product, x in a register (bound)", [=, &x] {
         const vf xr = load(x.data());
         #pragma omp parallel for schedule(static)
         for (int64_t r = 0; r < rows; ++r) yp[r] = row_times_register(wp + r * IN, xr);
       }},
      {"GEMV, two adjacent rows at once", [=, &x] {
         #pragma omp parallel for schedule(static)
         for (int64_t r = 0; r < rows; r += 2) adjacent_pair(x.data(), wp + r * IN, yp + r);
       }},
      {"GEMV, two far-apart rows at once", [=, &x] { far_rows<2>(x.data(), wp, rows, yp); }},
      {"GEMV, four far-apart rows at once", [=, &x] { far_rows<4>(x.data(), wp, rows, yp); }},
      {"ef_linear_f32 (what the engine runs)", [=, &x, &out, &none] {
         float* ys = yp;
         ef_linear_f32(x.data(), 1, IN, 1, &wp, &out, &none, &ys);
       }},
    };
  };
  // every variant over 4 KiB pages and over huge pages, interleaved in each round
  const std::vector<std::pair<std::string, float*>> buffers = {{"4 KiB", weights(n, false)}, {"huge", weights(n, true)}};
  std::vector<std::pair<std::string, std::function<void()>>> variants;
  std::vector<std::string> pages;
  for (const auto& [name, w] : buffers)
    for (auto& v : variants_over(w)) {
      variants.push_back(v);
      pages.push_back(name);
    }
  const size_t per_buffer = variants.size() / buffers.size();
  std::vector<std::vector<double>> speed(variants.size()), ratio(variants.size());
  for (auto& v : variants) v.second();  // warm-up: page faults, thread start
  for (int64_t round = 0; round < rounds; ++round)
    for (size_t v = 0; v < variants.size(); ++v) {
      const double started = omp_get_wtime();
      variants[v].second();
      speed[v].push_back(n * 4.0 / (omp_get_wtime() - started) / 1e9);
      ratio[v].push_back(speed[v].back() / speed[v - v % per_buffer].back());  // the same pages' one-stream sum
    }
  for (size_t v = 0; v < variants.size(); ++v) {
    std::sort(speed[v].begin(), speed[v].end());
    std::sort(ratio[v].begin(), ratio[v].end());
    std::printf("%s\t%s\t%.2f\t%.3f\t%.3f\t%.3f\n", variants[v].first.c_str(), pages[v].c_str(),
                speed[v][speed[v].size() / 2], ratio[v][ratio[v].size() / 2], ratio[v].front(), ratio[v].back());
  }
  return sink == 12345.0;
}
