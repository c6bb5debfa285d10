// ns per element of the CPU loops themselves (no Python, no threads): AdamW and ADOPT on bf16
// params, grads and states, rounded to nearest and stochastically, one thread, 262144 elements
// (L2-resident), the 512-bit copy (csrc/cpu/driver.h's target), best of rounds x 20 steps. Two
// checkouts' loops run alternating in one process, so a shared machine's load hits both alike;
// a checksum of 7 steps' results per case shows whether they store the same bits.
//
//   for t in base:/work/main mine:$PWD; do
//     g++ -O3 -ffp-contract=off -fno-math-errno -std=c++17 -I ${t#*:}/csrc/include -DVAR=${t%%:*} \
//         -c benchmarks/cpu_loop_ns.cpp -o /tmp/loop_${t%%:*}.o; done
//   g++ -O2 -std=c++17 -DDRIVER '-DVARS=X(base) X(mine)' benchmarks/cpu_loop_ns.cpp /tmp/loop_*.o \
//       -o /tmp/cpu_loop_ns && taskset -c 1 /tmp/cpu_loop_ns 20
//
// Each checkout's headers go into a namespace of their own (VAR), so both sets of loops link
// into one binary; the flags are those of mupopt/kernels/cpp/build.py.
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <type_traits>
#include <vector>

#if defined(DRIVER)
typedef void (*Fn)(int, int64_t, int, double*, uint32_t*);
#define X(v) extern "C" void v##_fn(int, int64_t, int, double*, uint32_t*);
VARS
#undef X
#define X(v) {#v, v##_fn},
struct Variant {
  const char* name;
  Fn fn;
} variants[] = {VARS};

int main(int argc, char** argv) {
  const int rounds = argc > 1 ? atoi(argv[1]) : 10;
  const int64_t n = 262144;
  const int nv = sizeof(variants) / sizeof(variants[0]);
  const char* name[4] = {"adamw nearest   ", "adamw stochastic", "adopt nearest   ", "adopt stochastic"};
  for (int v = 0; v < nv; ++v) {
    printf("checksums %-8s", variants[v].name);
    for (int c = 0; c < 4; ++c) {
      uint32_t h;
      variants[v].fn(c, 1 << 16, 0, nullptr, &h);
      printf(" %08x", h);
    }
    printf("\n");
  }
  std::vector<double> best(nv * 4, 1e30);
  for (int r = 0; r < rounds; ++r) {
    for (int c = 0; c < 4; ++c) {
      for (int k = 0; k < nv; ++k) {
        const int v = (k + r) % nv;  // each checkout goes first in turn
        variants[v].fn(c, n, 20, &best[v * 4 + c], nullptr);
      }
    }
  }
  printf("ns per element, best of %d steps:\n", rounds * 20);
  for (int c = 0; c < 4; ++c) {
    printf("%s", name[c]);
    for (int v = 0; v < nv; ++v) printf("  %s %.3f", variants[v].name, best[v * 4 + c]);
    printf("\n");
  }
}

#else
#define VAR_FN_(v) v##_fn
#define VAR_FN(v) VAR_FN_(v)
namespace VAR {
#include "mupopt/adamw.h"
#include "mupopt/adopt.h"
#include "mupopt/multi_tensor.h"
using namespace mupopt;

template <class Op, Rounding R>
__attribute__((target("avx2,fma,avx512f,avx512vl,avx512bw,avx512dq,prefer-vector-width=512"), noinline)) void span(
    const Op& op, const TensorRow& row, int64_t b, int64_t e) {
  cpu_span<Op, true, bf16_t, bf16_t, bf16_t, R>(op, row, b, e, 1.0f, nullptr, nullptr);
}

struct Data {
  std::vector<bf16_t> p, g, m, v;
  TensorRow row{};
};

inline float uniform() { return static_cast<float>(rand()) / static_cast<float>(RAND_MAX); }

inline Data make(int64_t n) {
  Data d;
  d.p.resize(n), d.g.resize(n), d.m.resize(n), d.v.resize(n);
  srand(1);
  for (int64_t i = 0; i < n; ++i) {
    d.p[i] = from_float<bf16_t>(uniform() - 0.5f);
    d.g[i] = from_float<bf16_t>(uniform() - 0.5f);
    d.m[i] = from_float<bf16_t>(0.01f * uniform());
    d.v[i] = from_float<bf16_t>(0.001f * uniform());
  }
  TensorRow& row = d.row;
  row.ptr[0] = d.p.data(), row.ptr[1] = d.g.data(), row.ptr[2] = d.m.data(), row.ptr[3] = d.v.data();
  row.numel = n;
  // AdamW: decay, step size, sqrt(1 - b2^t), eps; ADOPT: first, decay alpha, step alpha, eps, clip.
  const double scalars[5] = {0.9999, -1e-3, 0.3, 1e-8, 2.0};
  for (int k = 0; k < 5; ++k) row.scalar[k] = scalars[k];
  row.sr_key = 12345;
  return d;
}

template <class Op, Rounding R>
void step(const Op& op, const TensorRow& row) {
  for (int64_t b = 0; b < row.numel; b += kCpuChunk) span<Op, R>(op, row, b, std::min(b + kCpuChunk, row.numel));
}

template <class Op, Rounding R>
void time_case(const Op& op, int64_t n, int reps, double* best, uint32_t* checksum) {
  if (checksum != nullptr) {
    Data d = make(n);
    for (int s = 0; s < 7; ++s, ++d.row.sr_key) step<Op, R>(op, d.row);
    uint32_t h = 2166136261u;  // FNV-1a over the stored bytes
    for (const std::vector<bf16_t>* s : {&d.p, &d.m, &d.v}) {
      const unsigned char* c = reinterpret_cast<const unsigned char*>(s->data());
      for (size_t i = 0; i < s->size() * sizeof(bf16_t); ++i) h = (h ^ c[i]) * 16777619u;
    }
    *checksum = h;
    return;
  }
  static Data d = make(n);
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    step<Op, R>(op, d.row);
    const auto t1 = std::chrono::steady_clock::now();
    *best = std::min(*best, std::chrono::duration<double, std::nano>(t1 - t0).count() / n);
  }
}
}  // namespace VAR

// case: 0 AdamW nearest, 1 AdamW stochastic, 2 ADOPT nearest, 3 ADOPT stochastic.
extern "C" void VAR_FN(VAR)(int c, int64_t n, int reps, double* best, uint32_t* checksum) {
  using namespace VAR::mupopt;
  static const AdamWOp<false> adamw{make_adamw_hyper(0.9, 0.999)};
  static const AdoptOp adopt{make_adopt_hyper(0.9, 0.9999)};
  switch (c) {
    case 0: VAR::time_case<AdamWOp<false>, Rounding::kNearest>(adamw, n, reps, best, checksum); break;
    case 1: VAR::time_case<AdamWOp<false>, Rounding::kStochastic>(adamw, n, reps, best, checksum); break;
    case 2: VAR::time_case<AdoptOp, Rounding::kNearest>(adopt, n, reps, best, checksum); break;
    default: VAR::time_case<AdoptOp, Rounding::kStochastic>(adopt, n, reps, best, checksum); break;
  }
}
#endif
