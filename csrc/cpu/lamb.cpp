// LAMB on the CPU (csrc/include/mupopt/lamb.h): the norm pass, the trust ratios, the update
// pass, in the form the states' dtype and the tensors' sizes call for (see lamb.h).
//
// Blocks. The rows of a launch are taken in blocks of at most kLambBlock elements (a larger
// tensor is a block of its own) and both passes of a block run before the next block on the
// same threads, so that pass 2 finds in the cache what pass 1 touched (see lamb() for which
// threads). With float32 states pass 1 of such a block
// also writes u into a float32 scratch and pass 2 reads p and u only: no second square root
// and division per element. Measured on this 2-core AMD EPYC (32 MB L3), 16M parameters in
// tensors of 1M, LAMB against our AdamW in the same process: 1.66x for two passes over the
// whole list (u recomputed), 1.40x blocked, 1.34x blocked with u kept (performance.md's byte
// ratio: 1.43x). A block of 1M elements touches 20 MB (p g m v u): it stays within a 32 MB L3
// (float64: 40 MB).
// For one 16M tensor a 64 MB scratch gained nothing (1.63x against 1.67x), so tensors above
// kLambBlock recompute u from the stored moments instead and need no scratch.
//
// Per-chunk float64 partial sums are added per tensor in chunk order, so the result is the same
// for any thread count and any blocking.
#include <algorithm>
#include <memory>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "ops.h"

namespace mupopt {
namespace cpu {

namespace {

constexpr int64_t kLambBlock = int64_t{1} << 20;

// A row's two sums: its chunks' float64 partials added in chunk order.
void row_sums(const TensorRow& row, const std::vector<double>& partials, double& p_sq, double& u_sq) {
  const int64_t first = row.first_chunk, n = chunks_of(row.numel, kCpuChunk);
  p_sq = 0.0;
  u_sq = 0.0;
  for (int64_t c = first; c < first + n; ++c) {
    p_sq += partials[c * kMaxReduce];
    u_sq += partials[c * kMaxReduce + 1];
  }
}

// Whether the states keep full precision (float32 or float64, format 32): pass 2 may read the
// moments pass 1 stored (see lamb.h).
bool wide_states(const Launch& l) {
  return l.state == StateFormat::kParam && (l.param == DType::kFloat32 || l.param == DType::kFloat64);
}

// A tensor's trust ratio in its compute type (float64 for float64 params).
double trust_of(DType d, double p_sq, double u_sq, const LambHyper& h) {
  return d == DType::kFloat64 ? lamb_trust(p_sq, u_sq, h.f64) : lamb_trust(p_sq, u_sq, h.f32);
}

// Pass 1, trust ratios, pass 2 over one block; rows' first_chunk counted from the block's start.
template <LambKeep kKeep, LambSource kSource>
void lamb_block(const Launch& l, const LambHyper& h, const Args& a, std::vector<double>& partials) {
  partials.assign(static_cast<size_t>(l.n_chunks) * kMaxReduce, 0.0);
  run(LambNormOp<kKeep>{h}, l, a, partials.data());
  for (int r = 0; r < l.n_rows; ++r) {
    TensorRow& row = l.rows[r];
    double p_sq, u_sq;
    row_sums(row, partials, p_sq, u_sq);
    row.scalar[LambScalars::kTrust] = trust_of(l.param, p_sq, u_sq, h);
  }
  run(LambUpdateOp<kSource>{h}, l, a, nullptr);
}

}  // namespace

// Split form (lamb.h): pass 1 over the whole launch, each row's sums to sums[2*source].
void lamb_partials(const Launch& l, const LambHyper& h, const Args& a, double* sums) {
  if (skipped(a) || l.n_chunks == 0) return;
  std::vector<double> partials(static_cast<size_t>(l.n_chunks) * kMaxReduce, 0.0);
  if (wide_states(l)) {
    run(LambNormOp<LambKeep::kMoments>{h}, l, a, partials.data());
  } else {
    run(LambNormOp<LambKeep::kNothing>{h}, l, a, partials.data());
  }
  for (int r = 0; r < l.n_rows; ++r) {
    const TensorRow& row = l.rows[r];
    row_sums(row, partials, sums[2 * static_cast<int64_t>(row.source)], sums[2 * static_cast<int64_t>(row.source) + 1]);
  }
}

void lamb_apply(const Launch& l, const LambHyper& h, const Args& a, const double* sums) {
  if (skipped(a) || l.n_chunks == 0) return;
  for (int r = 0; r < l.n_rows; ++r) {
    TensorRow& row = l.rows[r];
    const int64_t i = row.source;
    row.scalar[LambScalars::kTrust] = trust_of(l.param, sums[2 * i], sums[2 * i + 1], h);
  }
  if (wide_states(l)) {
    run(LambUpdateOp<LambSource::kFromMoments>{h}, l, a, nullptr);
  } else {
    run(LambUpdateOp<LambSource::kRecompute>{h}, l, a, nullptr);
  }
}

namespace {

// The rows of a launch cut into blocks: consecutive rows of at most kLambBlock elements together
// (a larger tensor is a block of its own).
struct Block {
  int r0, r1;
  int64_t numel;
};

// u's scratch outlives the call, one buffer per thread of a team, kept by the calling thread and
// grown to the largest request: allocated per call, its pages were faulted in again at every
// step (glibc hands a freed multi-MB block back to the kernel), 2016 minor faults per step for
// two 4 MB buffers, and LAMB took 2.0x our AdamW's time instead of 1.3x at 4M parameters in 8
// tensors on the 2-core Xeon. At most kLambBlock elements of the states' dtype per buffer.
class Scratch {
 public:
  unsigned char* get(size_t bytes) {
    if (bytes > bytes_) {
      data_.reset(new unsigned char[bytes]);
      bytes_ = bytes;
    }
    return data_.get();
  }

 private:
  std::unique_ptr<unsigned char[]> data_;
  size_t bytes_ = 0;
};

Scratch& scratch(size_t k) {
  thread_local std::vector<Scratch> pool;
  if (pool.size() <= k) pool.resize(k + 1);
  return pool[k];
}

// What one thread needs to run whole blocks: a copy of a block's rows (first_chunk counted from
// the block's start; the trust ratios are written there), the chunk partials, and u's scratch in
// the states' dtype (when the states are float32 or float64: no block keeping u is larger than
// ``capacity`` elements).
struct BlockRunner {
  const Launch& l;
  const LambHyper& h;
  size_t elem;       // bytes per element of the states
  int64_t capacity;  // elements of u's scratch: no block that keeps u is larger
  std::vector<TensorRow> rows;
  std::vector<double> partials;
  unsigned char* direction = nullptr;

  // Everything a thread will allocate for ``blocks``, allocated here (before a parallel region:
  // nothing may throw inside one), with the scratch buffer ``k`` of the calling thread.
  void reserve(const std::vector<Block>& blocks, size_t k) {
    size_t max_rows = 0, max_chunks = 0;
    for (const Block& b : blocks) {
      int64_t chunks = 0;
      for (int r = b.r0; r < b.r1; ++r) chunks += chunks_of(l.rows[r].numel, kCpuChunk);
      max_rows = std::max(max_rows, static_cast<size_t>(b.r1 - b.r0));
      max_chunks = std::max(max_chunks, static_cast<size_t>(chunks));
    }
    rows.reserve(max_rows);
    partials.reserve(max_chunks * kMaxReduce);
    if (wide_states(l)) direction = scratch(k).get(static_cast<size_t>(capacity) * elem);
  }

  void operator()(const Block& b, const Args& a) {
    rows.assign(l.rows + b.r0, l.rows + b.r1);
    int64_t n_chunks = 0;
    for (TensorRow& row : rows) {
      row.first_chunk = n_chunks;
      n_chunks += chunks_of(row.numel, kCpuChunk);
    }
    Launch block = l;
    block.rows = rows.data();
    block.n_rows = b.r1 - b.r0;
    block.n_chunks = n_chunks;
    if (!wide_states(l)) {
      lamb_block<LambKeep::kNothing, LambSource::kRecompute>(block, h, a, partials);
    } else if (b.numel > kLambBlock) {
      lamb_block<LambKeep::kMoments, LambSource::kFromMoments>(block, h, a, partials);
    } else {
      if (direction == nullptr) direction = scratch(0).get(static_cast<size_t>(capacity) * elem);
      size_t offset = 0;
      for (TensorRow& row : rows) {
        row.ptr[4] = direction + offset;
        offset += static_cast<size_t>(row.numel) * elem;
      }
      lamb_block<LambKeep::kMomentsAndDirection, LambSource::kFromDirection>(block, h, a, partials);
    }
  }
};

// Thread t of n takes the blocks whose middle element falls in its n-th of the elements; the
// assignment is used when no thread gets more than this much over an even share, e.g. 16 blocks
// of 1M elements or 4 of 1M on 2 threads (else the threads share every block).
constexpr double kLambImbalance = 1.125;

int owner(const Block& b, int64_t start, int64_t total, int n) {
  return static_cast<int>(static_cast<double>(start + b.numel / 2) * n / static_cast<double>(total));
}

}  // namespace

// Blocks of at most kLambBlock elements run whole on one thread each: pass 1, trust ratios and
// pass 2 with no barrier in between, all of them in one parallel region. A tensor above
// kLambBlock, or blocks too few to share out evenly, run with every thread on each pass (a
// parallel region per pass). One region per step instead of two per block matters on a shared
// machine: every region waits for its slowest thread to be scheduled (measured, 2 cores at load
// 9: 16M parameters in 16 tensors took 8.3x our AdamW's time with 32 regions). The chunks, their
// partial sums and the order of those sums are the same either way, so the results are too.
void lamb(const Launch& l, const LambHyper& h, const Args& a) {
  if (skipped(a) || l.n_chunks == 0) return;
  const size_t elem = l.param == DType::kFloat64 ? sizeof(double) : sizeof(float);
  std::vector<Block> whole;  // blocks of at most kLambBlock elements
  int64_t whole_total = 0, total = 0;
  for (int r = 0; r < l.n_rows; ++r) total += l.rows[r].numel;
  const int64_t capacity = std::min(total, kLambBlock);
  BlockRunner shared{l, h, elem, capacity, {}, {}};
  for (int r0 = 0, r1 = 0; r0 < l.n_rows; r0 = r1) {
    int64_t numel = 0;
    while (r1 < l.n_rows && (r1 == r0 || numel + l.rows[r1].numel <= kLambBlock)) numel += l.rows[r1++].numel;
    const Block b{r0, r1, numel};
    if (numel > kLambBlock) {
      shared(b, a);
    } else {
      whole.push_back(b);
      whole_total += numel;
    }
  }
  const int n = a.num_threads;
  bool per_thread = n > 1 && whole.size() > 1 && whole_total >= kParallelMin;
  if (per_thread) {
    std::vector<int64_t> load(static_cast<size_t>(n), 0);
    int64_t start = 0;
    for (const Block& b : whole) {
      load[owner(b, start, whole_total, n)] += b.numel;
      start += b.numel;
    }
    per_thread = *std::max_element(load.begin(), load.end()) <= kLambImbalance * static_cast<double>(whole_total) / n;
  }
  if (!per_thread) {
    for (const Block& b : whole) shared(b, a);
    return;
  }
  std::vector<BlockRunner> runners;
  runners.reserve(static_cast<size_t>(n));
  for (int t = 0; t < n; ++t) {
    runners.push_back(BlockRunner{l, h, elem, capacity, {}, {}});
    runners.back().reserve(whole, static_cast<size_t>(t));
  }
  Args one = a;
  one.num_threads = 1;
#pragma omp parallel num_threads(n)
  {
    // The team OpenMP gave (fewer threads than asked for inside another parallel region, or
    // under a thread limit): every block still has exactly one owner in it.
#if defined(_OPENMP)
    const int t = omp_get_thread_num(), team = omp_get_num_threads();
#else
    const int t = 0, team = 1;
#endif
    BlockRunner& mine = runners[static_cast<size_t>(t)];
    int64_t start = 0;
    for (const Block& b : whole) {
      if (owner(b, start, whole_total, team) == t) mine(b, one);
      start += b.numel;
    }
  }
}

}  // namespace cpu
}  // namespace mupopt
