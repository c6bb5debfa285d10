// Host side of the bindings (torch headers allowed here, nowhere below csrc/cpu or csrc/cuda):
// validates an op's tensor lists and builds its launch table (csrc/include/mupopt/
// multi_tensor.h), grouped into launches of one (param/state dtype, grad dtype, variant).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <functional>
#include <numeric>
#include <string>
#include <vector>

#include "mupopt/multi_tensor.h"

namespace mupopt {
namespace binding {

// One stream of an op: a tensor list and its name in the schema. Stream 0 is the param-like
// list, 1 the gradient-like list, 2.. the states (which must share stream 0's dtype).
struct Stream {
  at::TensorList list;
  const char* name = nullptr;  // nullptr: stream unused by this op
};

struct Group {
  int begin;         // first row in Table::rows
  int n_rows;
  int64_t n_chunks;  // chunks of the group; first_chunk restarts at 0 in every group
  DType param;
  DType grad;
  StateFormat state;
  int variant;
};

struct Table {
  std::vector<TensorRow> rows;
  // Format 8: one map per state stream (the op's ``maps``, storage.h), read by the loops.
  std::array<QuantTable, kMaxStreams> maps{};
  std::vector<int64_t> source;  // per row: the tensor's index in the op's lists
  std::vector<Group> groups;
  c10::optional<c10::Device> device;  // empty when every list is empty
  bool stochastic = false;  // param stores rounded stochastically (rows' sr_key; set_rounding)
  bool compensated = false;  // kahan_summation: 16-bit params with a compensation (rows' compensation)
};

// The param format of a launch group (storage.h): its dtype, or the stochastic or compensated
// code of it.
inline DType launch_param(const Table& t, const Group& g) {
  return t.compensated ? compensated_format(g.param) : t.stochastic ? stochastic_format(g.param) : g.param;
}

inline DType storage_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kHalf:
      return DType::kFloat16;
    case at::kDouble:
      return DType::kFloat64;
    default:
      return DType::kFloat32;
  }
}

inline std::string describe(const at::Tensor& t) {
  return std::string(c10::toString(t.scalar_type())) + " tensor of shape " + c10::str(t.sizes()) + " on " +
         t.device().str();
}

// A row's launch group: (variant, state format, param dtype, grad dtype), in this order of
// precedence.
inline int group_key(int variant, DType param, DType grad, StateFormat state = StateFormat::kParam) {
  return ((variant * kStateFormatCount + static_cast<int>(state)) * kDTypeCount + static_cast<int>(param)) *
             kDTypeCount +
         static_cast<int>(grad);
}
inline int key_variant(int key) { return key / (kStateFormatCount * kDTypeCount * kDTypeCount); }
inline StateFormat key_state(int key) {
  return static_cast<StateFormat>((key / (kDTypeCount * kDTypeCount)) % kStateFormatCount);
}
inline DType key_param(int key) { return static_cast<DType>((key / kDTypeCount) % kDTypeCount); }
inline DType key_grad(int key) { return static_cast<DType>(key % kDTypeCount); }

// Sorts rows (stably) into launch groups by key and numbers each group's chunks from 0: the
// table's rows, source and groups. ``sources[k]``: row k's index in the op's lists.
inline void group_rows(const std::vector<TensorRow>& rows, const std::vector<int64_t>& sources,
                       const std::vector<int>& keys, int64_t chunk, Table& table) {
  std::vector<int> order(rows.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return keys[a] < keys[b]; });
  table.rows.clear();
  table.source.clear();
  table.groups.clear();
  table.rows.reserve(rows.size());
  table.source.reserve(rows.size());
  for (size_t k = 0; k < order.size(); ++k) {
    const int key = keys[order[k]];
    if (table.groups.empty() || keys[order[k - 1]] != key) {
      Group g;
      g.begin = static_cast<int>(k);
      g.n_rows = 0;
      g.n_chunks = 0;
      g.variant = key_variant(key);
      g.param = key_param(key);
      g.grad = key_grad(key);
      g.state = key_state(key);
      table.groups.push_back(g);
    }
    Group& g = table.groups.back();
    TensorRow row = rows[order[k]];
    row.first_chunk = g.n_chunks;
    g.n_chunks += chunks_of(row.numel, chunk);
    g.n_rows += 1;
    table.rows.push_back(row);
    table.source.push_back(sources[order[k]]);
  }
}

// Whether ``t``'s address allows the 4-element vector accesses of the CUDA kernel.
inline bool vector_aligned(const void* ptr, const at::Tensor& t) {
  const uintptr_t vec_bytes = 4 * static_cast<uintptr_t>(t.element_size());
  return reinterpret_cast<uintptr_t>(ptr) % vec_bytes == 0;
}

// The checks every tensor of an op's lists passes: defined, on ``device``, float32, bfloat16 or
// float16 (or float64 on the CPU: the CUDA kernels compute in float32 only; or uint8 where
// ``codes_ok``: format 8's states), ``numel`` elements (those of the reference list's tensor
// ``ref_name``[i]), contiguous.
inline void check_tensor(const char* op, const char* name, int64_t i, const at::Tensor& t,
                         const c10::Device& device, const char* ref_name, int64_t numel, bool codes_ok = false) {
  TORCH_CHECK(t.defined(), op, ": ", name, "[", i, "] is undefined");
  TORCH_CHECK(t.device() == device, op, ": ", name, "[", i, "] is a ", describe(t),
              " but the call's tensors are on ", device.str(), " (one device per call)");
  const at::ScalarType d = t.scalar_type();
  const bool f64 = d == at::kDouble && device.is_cpu();
  TORCH_CHECK(d == at::kFloat || d == at::kBFloat16 || d == at::kHalf || f64 || (codes_ok && d == at::kByte), op,
              ": ", name, "[", i, "] is a ", describe(t), "; supported: float32, bfloat16, float16",
              device.is_cpu() ? ", float64" : " (float64: the cpu and reference backends)",
              codes_ok ? " (uint8: codes of state_bits=8)" : "");
  TORCH_CHECK(t.numel() == numel, op, ": ", name, "[", i, "] has ", t.numel(), " elements but ", ref_name, "[",
              i, "] has ", numel);
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, "[", i, "] (", describe(t), ", strides ", t.strides(),
              ") is not contiguous; the kernels read each tensor as one flat array");
}

// The format of a state tensor ``t`` of param ``p`` (state_bits, storage.h's StateFormat): the
// param's dtype (32), bfloat16 for a param of another dtype (16), uint8 codes (8).
inline StateFormat state_format_of(const char* op, const char* name, int64_t i, const at::Tensor& t,
                                   const char* param_name, const at::Tensor& p) {
  const at::ScalarType d = t.scalar_type(), pd = p.scalar_type();
  if (d == pd) return StateFormat::kParam;
  const bool narrow_ok = pd == at::kFloat || pd == at::kHalf || pd == at::kBFloat16 || pd == at::kDouble;
  if (d == at::kBFloat16 && narrow_ok) return StateFormat::kBFloat16;
  if (d == at::kByte && narrow_ok) return StateFormat::kBlock8;
  TORCH_CHECK(false, op, ": ", name, "[", i, "] is ", c10::toString(d), " but ", param_name, "[", i, "] is ",
              c10::toString(pd), "; states must have their parameter's dtype, or be bfloat16 (state_bits=16) "
              "or uint8 codes (state_bits=8)");
  return StateFormat::kParam;
}

// Format 8's tables (storage.h's QuantTable), one int32 tensor per state stream of the op, on
// the CPU whatever the tensors' device: the host checks their headers here, the CPU loops read
// them in place and the CUDA ops copy them to the device with the launch table
// (bindings_cuda.cpp), so no device read is needed to check them.
inline QuantTable check_map(const char* op, size_t k, const at::Tensor& m) {
  TORCH_CHECK(m.defined() && m.scalar_type() == at::kInt && m.dim() == 1 && m.is_contiguous() &&
                  m.numel() > kQuantHeader,
              op, ": maps[", k, "] must be a contiguous 1-D int32 tensor (a state_bits=8 map table), got ",
              m.defined() ? describe(m) : std::string("an undefined tensor"));
  TORCH_CHECK(m.device().is_cpu(), op, ": maps[", k, "] is on ", m.device().str(),
              "; map tables are CPU tensors for every device (mupopt/kernels/cpp/ops.py map_table)");
  const int32_t* d = m.data_ptr<int32_t>();
  QuantTable q;
  q.value = reinterpret_cast<const float*>(d);
  q.lo = static_cast<uint32_t>(d[256]);
  q.count = static_cast<uint32_t>(d[257]);
  TORCH_CHECK(d[256] >= 0 && d[257] > 0 && q.lo + q.count <= 0x8000u &&
                  m.numel() == kQuantHeader + 2 * static_cast<int64_t>(q.count) + kQuantVectorWords,
              op, ": maps[", k, "] is not a map table (header lo=", d[256], ", count=", d[257], ", ", m.numel(),
              " values)");
  q.entry = reinterpret_cast<const uint32_t*>(d + kQuantHeader);
  const int32_t* v = d + kQuantHeader + 2 * static_cast<int64_t>(q.count);
  q.value_planes = reinterpret_cast<const uint8_t*>(v);
  q.mid_planes = reinterpret_cast<const uint8_t*>(v + 256);
  q.pivots = reinterpret_cast<const uint16_t*>(v + 512);
  if (v[704 + 130] != 0) q.lines = reinterpret_cast<const float*>(v + 704);  // ops.py's _rank_lines
  return q;
}

// The rows of an op's lists before grouping: one per non-empty tensor, with its index in the
// lists and its group key (make_table; the bound plans of bound.h keep them between steps).
struct RowSet {
  std::vector<TensorRow> rows;
  std::vector<int64_t> sources;
  std::vector<int> keys;
  c10::optional<c10::Device> device;  // empty when every list is empty
  std::array<QuantTable, kMaxStreams> maps{};
  bool compensated = false;  // kahan_summation (LeanLists::compensations given)
};

// float64 is computed in float64, every other storage dtype in float32: a gradient is float64
// exactly when its parameter is (torch's AdamW refuses the mixed pairs too).
inline void check_grad_dtype(const char* op, int64_t i, const at::Tensor& g, const char* param_name,
                             const at::Tensor& param) {
  TORCH_CHECK((g.scalar_type() == at::kDouble) == (param.scalar_type() == at::kDouble), op, ": grads[", i, "] is ",
              c10::toString(g.scalar_type()), " but ", param_name, "[", i, "] is ",
              c10::toString(param.scalar_type()),
              "; float64 gradients need float64 params and states, and the other way round");
}

// State formats (streams >= 2): each tensor's states share one format (state_format_of). Format
// 8 states come with ``absmax``: their float32 block scales, in list order (tensor by tensor,
// each tensor's quantized states in stream order), and ``maps``: one table per state stream.
//
// kahan_summation (storage.h's compensated param format): ``compensations`` given (even empty)
// holds the compensation of every bfloat16 / float16 param, in list order, each of its param's
// dtype, size and device, contiguous; float32 / float64 params have none (their store is exact).
struct LeanLists {
  at::TensorList absmax;
  at::TensorList maps;
  bool raw_bytes = false;  // uint8 states are plain bytes (StateFormat::kBytes: traffic_ only)
  c10::optional<at::TensorList> compensations = c10::nullopt;
};

using OptTensors = c10::optional<at::TensorList>;

// The storage lists of an op as its schema gives them: state_bits=8's block scales and maps
// (absent or given), kahan_summation's compensations (absent: off).
inline LeanLists lean_lists(const OptTensors& absmax, const OptTensors& maps, const OptTensors& compensations = {}) {
  return LeanLists{absmax.value_or(at::TensorList()), maps.value_or(at::TensorList()), false, compensations};
}

// Whether a param of this dtype has a compensation under kahan_summation.
inline bool compensates(const at::Tensor& p) {
  return p.scalar_type() == at::kBFloat16 || p.scalar_type() == at::kHalf;
}

// Checks the lists of ``op`` and builds their rows (see make_table). Nothing is modified.
inline RowSet make_rows(const char* op, const std::array<Stream, kMaxStreams>& streams, const double* scal,
                        int n_scalars, const std::function<int(int64_t)>& variant = nullptr,
                        const LeanLists& lean = {}) {
  int ref = -1;
  for (int s = 0; s < kMaxStreams && ref < 0; ++s) {
    if (streams[s].name != nullptr) ref = s;
  }
  TORCH_CHECK(ref >= 0, op, ": no tensor lists");
  const int64_t n = static_cast<int64_t>(streams[ref].list.size());
  TORCH_CHECK(n < (int64_t{1} << 31), op, ": too many tensors (", n, ")");
  for (int s = 0; s < kMaxStreams; ++s) {
    if (streams[s].name == nullptr) continue;
    TORCH_CHECK(static_cast<int64_t>(streams[s].list.size()) == n, op, ": ", streams[s].name, " has ",
                streams[s].list.size(), " tensors but ", streams[ref].name, " has ", n);
  }
  const bool has_param = streams[0].name != nullptr;

  RowSet out;
  out.compensated = lean.compensations.has_value();
  TORCH_CHECK(!out.compensated || has_param, op, ": compensations (kahan_summation) without params");
  const at::TensorList comps = lean.compensations.value_or(at::TensorList());
  size_t used_comps = 0;
  out.rows.reserve(n);
  out.sources.reserve(n);
  out.keys.reserve(n);
  size_t used_absmax = 0;
  bool any_q8 = false;
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& r = streams[ref].list[i];
    TORCH_CHECK(r.defined(), op, ": ", streams[ref].name, "[", i, "] is undefined");
    if (!out.device) out.device = r.device();
    // What the states' format is relative to: the param; without one (sophia_hessian_) the first
    // state itself (format 32, any gradient dtype), or the gradient where the state is uint8 codes.
    int param_stream = 0;
    if (!has_param) {
      const at::Tensor& first = streams[2].list[i];
      param_stream = first.defined() && first.scalar_type() == at::kByte ? 1 : 2;
    }
    const at::Tensor& pt = streams[param_stream].list[i];
    TensorRow row;
    std::memset(&row, 0, sizeof row);
    row.numel = r.numel();
    row.aligned = 1;
    int first_state = -1;
    StateFormat format = StateFormat::kParam;
    for (int s = 0; s < kMaxStreams; ++s) {
      if (streams[s].name == nullptr) continue;
      const at::Tensor& t = streams[s].list[i];
      const bool state = s >= 2 && s != param_stream;
      check_tensor(op, streams[s].name, i, t, *out.device, streams[ref].name, row.numel, state);
      if (state) {
        StateFormat f = state_format_of(op, streams[s].name, i, t, streams[param_stream].name, pt);
        if (f == StateFormat::kBlock8 && lean.raw_bytes) f = StateFormat::kBytes;
        if (first_state < 0) {
          first_state = s;
          format = f;
        }
        TORCH_CHECK(f == format, op, ": ", streams[s].name, "[", i, "] is ", c10::toString(t.scalar_type()),
                    " but ", streams[first_state].name, "[", i, "] is ",
                    c10::toString(streams[first_state].list[i].scalar_type()),
                    "; a tensor's states share one format (state_bits)");
        if (f == StateFormat::kBlock8) {
          TORCH_CHECK(used_absmax < lean.absmax.size(), op, ": ", streams[s].name, "[", i,
                      "] holds uint8 codes (state_bits=8) but absmax has only ", lean.absmax.size(),
                      " tensors (one per quantized state, in list order)");
          const at::Tensor& a = lean.absmax[used_absmax];
          const int64_t blocks = (row.numel + kQuantBlock - 1) / kQuantBlock;
          TORCH_CHECK(a.defined() && a.scalar_type() == at::kFloat && a.dim() == 1 && a.numel() == blocks &&
                          a.is_contiguous() && a.device() == *out.device,
                      op, ": absmax[", used_absmax, "] (the block scales of ", streams[s].name, "[", i,
                      "]) must be a contiguous float32 tensor of shape [", blocks, "] on ", out.device->str(),
                      " (one per ", kQuantBlock, " elements), got ",
                      a.defined() ? describe(a) : std::string("an undefined tensor"));
          row.absmax[s] = a.data_ptr<float>();
          ++used_absmax;
          any_q8 = true;
        }
      } else if (s == 1 && param_stream != 1) {
        check_grad_dtype(op, i, t, streams[param_stream].name, pt);
      }
      if (row.numel > 0) {
        row.ptr[s] = t.data_ptr();
        if (!vector_aligned(row.ptr[s], t)) row.aligned = 0;
      }
    }
    if (out.compensated && compensates(pt)) {
      TORCH_CHECK(used_comps < comps.size(), op, ": params[", i, "] is ", c10::toString(pt.scalar_type()),
                  " with kahan_summation but compensations has only ", comps.size(),
                  " tensors (one per bfloat16 / float16 param, in list order)");
      const at::Tensor& c = comps[used_comps];
      TORCH_CHECK(c.defined() && c.scalar_type() == pt.scalar_type() && c.numel() == row.numel &&
                      c.is_contiguous() && c.device() == *out.device,
                  op, ": compensations[", used_comps, "] (the compensation of params[", i,
                  "]) must be a contiguous ", c10::toString(pt.scalar_type()), " tensor of ", row.numel,
                  " elements on ", out.device->str(), " like its param, got ",
                  c.defined() ? describe(c) : std::string("an undefined tensor"));
      if (row.numel > 0) {
        row.compensation = c.data_ptr();
        if (!vector_aligned(row.compensation, c)) row.aligned = 0;
      }
      ++used_comps;
    }
    if (row.numel == 0) continue;
    row.source = static_cast<int32_t>(i);
    for (int k = 0; scal != nullptr && k < n_scalars; ++k) row.scalar[k] = scal[i * n_scalars + k];
    const int v = variant ? variant(i) : 0;
    const DType grad = streams[1].name != nullptr ? storage_of(streams[1].list[i]) : DType::kFloat32;
    out.rows.push_back(row);
    out.sources.push_back(i);
    out.keys.push_back(group_key(v, storage_of(pt), grad, format));
  }
  TORCH_CHECK(used_comps == comps.size(), op, ": compensations has ", comps.size(),
              " tensors but the lists hold ", used_comps, " bfloat16 / float16 params (kahan_summation: one each)");
  TORCH_CHECK(used_absmax == lean.absmax.size(), op, ": absmax has ", lean.absmax.size(),
              " tensors but the lists hold ", used_absmax, " quantized (uint8) states");
  if (any_q8) {
    size_t n_states = 0;
    for (int s = 2; s < kMaxStreams; ++s) n_states += streams[s].name != nullptr ? 1 : 0;
    TORCH_CHECK(lean.maps.size() == n_states, op, ": maps has ", lean.maps.size(),
                " tables but state_bits=8 needs one per state list (", n_states, ")");
    size_t k = 0;
    for (int s = 2; s < kMaxStreams; ++s) {
      if (streams[s].name == nullptr) continue;
      out.maps[s] = check_map(op, k, lean.maps[k]);
      ++k;
    }
  }
  return out;
}

// Checks the lists of ``op`` and builds its table. ``scal``: N x n_scalars per-tensor scalars,
// or nullptr (the caller fills row.scalar later, through Table::source). ``variant(i)`` splits
// tensors that need different Ops (ADOPT's first step); empty tensors are validated and then
// left out (they have nothing to update). Nothing is modified: an error leaves every tensor as
// it was.
inline Table make_table(const char* op, const std::array<Stream, kMaxStreams>& streams, const double* scal,
                        int n_scalars, int64_t chunk, const std::function<int(int64_t)>& variant = nullptr,
                        const LeanLists& lean = {}) {
  const RowSet set = make_rows(op, streams, scal, n_scalars, variant, lean);
  Table table;
  table.device = set.device;
  table.maps = set.maps;
  table.compensated = set.compensated;
  group_rows(set.rows, set.sources, set.keys, chunk, table);
  return table;
}

// The optimizer states' "step": float32 CPU tensors with one element, as torch keeps them. The
// values before this call's increment.
inline std::vector<double> read_steps(const char* op, at::TensorList steps, int64_t n) {
  TORCH_CHECK(static_cast<int64_t>(steps.size()) == n, op, ": state_steps has ", steps.size(),
              " tensors but params has ", n);
  std::vector<double> out(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& s = steps[i];
    TORCH_CHECK(s.defined() && s.device().is_cpu() && s.scalar_type() == at::kFloat && s.numel() == 1, op,
                ": state_steps[", i, "] must be a float32 CPU tensor with one element (the state's \"step\"), got ",
                s.defined() ? describe(s) : std::string("an undefined tensor"));
    out[i] = static_cast<double>(*s.data_ptr<float>());
  }
  return out;
}

// step += 1 in float32, as the reference's st["step"] += 1; returns the new values as float64
// (what the reference's st["step"].item() reads).
inline double next_step(double before) { return static_cast<double>(static_cast<float>(before) + 1.0f); }

inline void bump_steps(at::TensorList steps) {
  for (const at::Tensor& s : steps) {
    float* v = s.data_ptr<float>();
    *v = *v + 1.0f;
  }
}

// Per-tensor muP multipliers: one float per tensor.
inline void check_mults(const char* op, const char* name, at::ArrayRef<double> m, int64_t n) {
  TORCH_CHECK(static_cast<int64_t>(m.size()) == n, op, ": ", name, " has ", m.size(), " values for ", n, " tensors");
}

// LAMB's per-tensor sums of squares handed to lamb_apply_: float64 [n, 2] on the call's device
// (what lamb_partials_ returned, reduced by the caller). Returned contiguous.
inline at::Tensor check_lamb_sums(const char* op, const at::Tensor& sums, int64_t n,
                                  const c10::optional<c10::Device>& device) {
  TORCH_CHECK(sums.defined() && sums.scalar_type() == at::kDouble && sums.dim() == 2 && sums.size(0) == n &&
                  sums.size(1) == 2,
              op, ": sums must be a float64 tensor of shape [", n,
              ", 2] (per tensor: the sum of p*p, the sum of u*u), got ",
              sums.defined() ? describe(sums) : std::string("an undefined tensor"));
  TORCH_CHECK(!device || sums.device() == *device, op, ": sums is on ", sums.device().str(),
              " but the tensors are on ", device->str());
  return sums.contiguous();
}

// grad_scale / found_inf: one float32 element on the call's device, or absent.
inline const float* optional_scalar(const char* op, const char* name, const c10::optional<at::Tensor>& t,
                                    const c10::optional<c10::Device>& device) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->numel() == 1 && t->scalar_type() == at::kFloat, op, ": ", name,
              " must be a float32 tensor with one element, got ", describe(*t));
  TORCH_CHECK(!device || t->device() == *device, op, ": ", name, " is on ", t->device().str(),
              " but the tensors are on ", device->str());
  return t->data_ptr<float>();
}

}  // namespace binding
}  // namespace mupopt
