// Format 8's block codec alone, outside torch (driven by benchmarks/bench_q8_codec.py, which
// dumps the map tables of mupopt/kernels/cpp/ops.py and compiles this file against a csrc/):
//   bench TABLE REPS   best-of-REPS ns per element of the VBMI encode and decode, one thread, on
//                      256 blocks (256 KiB of float32, L2-resident) of normal values * 1e-3;
//   check TABLE STEP   the VBMI encode against Q8Scalar (tests/test_lean_states_cpu.py holds it
//                      to the spec) on every STEP-th float32 pattern of [-1, 1] (STEP 1: all
//                      2^31 of them), in blocks of 255 led by 1.0 (absmax 1: y = x exactly), then
//                      200000 random blocks (random patterns: NaN, inf, subnormal, any absmax,
//                      tails of 1-256 values). Exit status 1 on any difference.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "q8_vbmi.h"

using namespace mupopt;
using namespace mupopt::cpu;

static std::vector<int32_t> load(const char* path) {
  std::vector<int32_t> v(1 << 16);
  FILE* f = fopen(path, "rb");
  if (f == nullptr) return {};
  v.resize(fread(v.data(), 4, v.size(), f));
  fclose(f);
  return v;
}

// As csrc/table.h's check_map, for the layout of this csrc/ (kQuantVectorWords).
static QuantTable table(const std::vector<int32_t>& d) {
  QuantTable q;
  q.value = reinterpret_cast<const float*>(d.data());
  q.lo = d[256];
  q.count = d[257];
  q.entry = reinterpret_cast<const uint32_t*>(d.data() + kQuantHeader);
  const int32_t* v = d.data() + kQuantHeader + 2 * q.count;
  q.value_planes = reinterpret_cast<const uint8_t*>(v);
  q.mid_planes = reinterpret_cast<const uint8_t*>(v + 256);
  q.pivots = reinterpret_cast<const uint16_t*>(v + 512);
#ifdef MUPOPT_RANK_LINES
  if (v[704 + 130] != 0) q.lines = reinterpret_cast<const float*>(v + 704);
#endif
  return q;
}

static int bench(const QuantTable& t, int reps) {
  const int nb = 256;
  std::vector<float> x(nb * kQuantBlock), q(nb * kQuantBlock), a(nb);
  std::vector<uint8_t> c(nb * kQuantBlock);
  std::mt19937 g(1);
  std::normal_distribution<float> nd;
  for (auto& v : x) v = nd(g) * 1e-3f;
  double enc = 1e9, dec = 1e9;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int b = 0; b < nb; ++b) Q8Vbmi::encode(&x[kQuantBlock * b], &c[kQuantBlock * b], &a[b], t, kQuantBlock);
    const auto t1 = std::chrono::steady_clock::now();
    for (int b = 0; b < nb; ++b) Q8Vbmi::decode(&c[kQuantBlock * b], a[b], t, &q[kQuantBlock * b], kQuantBlock);
    const auto t2 = std::chrono::steady_clock::now();
    enc = std::min(enc, std::chrono::duration<double, std::nano>(t1 - t0).count() / x.size());
    dec = std::min(dec, std::chrono::duration<double, std::nano>(t2 - t1).count() / x.size());
  }
  printf("encode %.3f decode %.3f\n", enc, dec);
  return 0;
}

static int check(const QuantTable& t, uint32_t step) {
  long bad = 0, total = 0;
  float q[kQuantBlock], r[kQuantBlock], a1, a2;
  uint8_t c1[kQuantBlock], c2[kQuantBlock];
  auto compare = [&](int n) {
    memcpy(r, q, sizeof q);
    Q8Scalar::encode(r, c1, &a1, t, n);
    Q8Vbmi::encode(q, c2, &a2, t, n);
    total += n;
    if (memcmp(&a1, &a2, 4) != 0 && bad++ < 10) printf("absmax %a != %a\n", a1, a2);
    for (int k = 0; k < n; ++k) {
      if (c1[k] != c2[k] && bad++ < 10) printf("x=%a absmax=%a: scalar %d, vbmi %d\n", q[k], a1, c1[k], c2[k]);
    }
  };
  for (uint32_t sign = 0; sign < 2; ++sign) {
    uint64_t u = 0;
    while (u <= 0x3F800000u) {
      int n = 0;
      q[n++] = 1.0f;
      for (; n < kQuantBlock && u <= 0x3F800000u; ++n, u += step) {
        const uint32_t b = static_cast<uint32_t>(u) | (sign << 31);
        memcpy(q + n, &b, 4);
      }
      compare(n);
    }
  }
  std::mt19937 g(7);
  std::uniform_int_distribution<uint32_t> ud;
  for (int it = 0; it < 200000; ++it) {
    const int n = 1 + static_cast<int>(ud(g) % kQuantBlock);
    for (int k = 0; k < n; ++k) {
      uint32_t b = ud(g);
      if (it % 3 == 0) b = (b & 0x807FFFFFu) | ((100 + b % 28) << 23);  // magnitudes 2^-27 .. 1
      if (it % 5 == 0) b &= 0x800FFFFFu;                                  // subnormal or zero
      memcpy(q + k, &b, 4);
    }
    compare(n);
  }
  printf("checked %ld values, %ld differences\n", total, bad);
  return bad != 0;
}

int main(int argc, char** argv) {
  if (argc != 4) return 2;
  const std::vector<int32_t> d = load(argv[2]);
  if (d.size() < kQuantHeader || static_cast<int64_t>(d.size()) != kQuantHeader + 2 * d[257] + kQuantVectorWords) {
    printf("%s is not a map table of this csrc/\n", argv[2]);
    return 2;
  }
  const QuantTable t = table(d);
  if (strcmp(argv[1], "bench") == 0) return bench(t, atoi(argv[3]));
  if (strcmp(argv[1], "check") == 0) return check(t, static_cast<uint32_t>(atoi(argv[3])));
  return 2;
}
