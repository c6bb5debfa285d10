// The memory bound of an AdamW step on this CPU: a loop with AdamW's traffic (reads p g m v,
// writes p m v: 28 B per element) and no division or square root, over 16M fp32 elements in
// 16 tensors, two OpenMP threads, chunks of 32768 as csrc/cpu/driver.h. No step of any
// implementation can move its 28 B per element faster than this loop does.
//
//   g++ -O3 -mavx2 -mfma -fopenmp benchmarks/cpu_stream_bound.cpp -o /tmp/stream && /tmp/stream
//
// Used in benchmarks/results/cpu-fused-2026-11-27.txt to show why "10x the reference" is out
// of reach on the 2-core VM: this loop is as slow as our AdamW step there.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

constexpr long kNumel = 16L << 20, kTensors = 16, kPer = kNumel / kTensors, kChunk = 32768;
constexpr int kReps = 25;

void traffic(float* __restrict p, const float* __restrict g, float* __restrict m, float* __restrict v, long b,
             long e) {
#pragma omp simd
  for (long i = b; i < e; ++i) {
    const float gi = g[i];
    const float mi = m[i] * 0.9f + gi * 0.1f;
    v[i] = v[i] * 0.999f + gi * gi * 0.001f;
    m[i] = mi;
    p[i] = p[i] * 0.99999f - 1e-9f * mi;
  }
}

}  // namespace

int main() {
  std::vector<float*> P(kTensors), G(kTensors), M(kTensors), V(kTensors);
  for (long t = 0; t < kTensors; ++t) {
    for (auto* list : {&P, &G, &M, &V}) (*list)[t] = static_cast<float*>(std::aligned_alloc(64, kPer * 4));
  }
  // First touch by the threads that stream them later (one socket here, but keep it honest).
#pragma omp parallel for num_threads(2) schedule(static)
  for (long c = 0; c < kNumel / kChunk; ++c) {
    const long t = c * kChunk / kPer, b = c * kChunk % kPer;
    for (long i = b; i < b + kChunk; ++i) P[t][i] = 1.0f, G[t][i] = 2.0f, M[t][i] = 3.0f, V[t][i] = 4.0f;
  }
  std::vector<double> seconds;
  for (int r = 0; r < kReps; ++r) {
    const auto start = std::chrono::steady_clock::now();
#pragma omp parallel for num_threads(2) schedule(static)
    for (long c = 0; c < kNumel / kChunk; ++c) {
      const long t = c * kChunk / kPer, b = c * kChunk % kPer;
      traffic(P[t], G[t], M[t], V[t], b, b + kChunk);
    }
    seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(seconds.begin(), seconds.end());
  const double med = seconds[kReps / 2];
  std::printf("AdamW traffic without its math, %ld fp32 elements in %ld tensors: median %.2f ms (%.1f GB/s at 28 B "
              "per element), fastest %.2f ms\n",
              kNumel, kTensors, med * 1e3, 28.0 * kNumel / med / 1e9, seconds[0] * 1e3);
  return 0;
}
