// Bound plans: the per-call ops' work split into what holds for many steps and what changes
// every step, for the optimizers' cached step plans (mupopt/kernels/cpp/ops.py, bind_*).
//
//   plan = torch.ops.mupopt.bind_adamw(params, exp_avgs, ..., state_steps, lr_mults, ...)
//       checks params, states and step tensors (make_rows, read_steps) and keeps them, their
//       rows without the gradient, and the multipliers;
//   torch.ops.mupopt.adamw_bound_(plan, grads, lr=..., ...) -> bool
//       checks the gradients (and that no bound tensor moved), then does what adamw_ does with
//       the same tensors: fills the gradient pointers into the kept rows, regroups only when a
//       gradient's dtype (or ADOPT's first-step split) changed, forms the scalars with the same
//       functions (prepare.h), bumps the steps, runs the same kernels.
//
// Per step this converts one tensor list instead of six and builds no row from a tensor. The
// plan holds references to every bound tensor. A tensor whose storage, size, dtype or layout
// changed in place since bind (``p.data = ...`` keeps the Python object) is noticed before
// anything is written: the step op then returns false and does nothing, and the caller binds
// again. Nothing is written either when a check fails (a RuntimeError naming the tensor).
#pragma once

#include <ATen/ATen.h>
#include <torch/custom_class.h>

#include <string>
#include <vector>

#include "prepare.h"
#include "table.h"

namespace mupopt {
namespace binding {

// What bind saw of one bound tensor; compared again at every step.
struct HeldTensor {
  at::Tensor tensor;
  const void* ptr;
  int64_t numel;
  at::ScalarType dtype;

  explicit HeldTensor(const at::Tensor& t)
      : tensor(t), ptr(t.const_data_ptr()), numel(t.numel()), dtype(t.scalar_type()) {}

  bool unchanged() const {
    return tensor.const_data_ptr() == ptr && tensor.numel() == numel && tensor.scalar_type() == dtype &&
           tensor.is_contiguous();
  }
};

struct BoundPlan : torch::CustomClassHolder {
  std::string name;  // the optimizer's per-call op ("adamw_", ...), for messages
  int64_t n = 0;     // tensors bound
  c10::Device device{c10::kCPU};
  std::vector<at::Tensor> params;  // the shapes the gradients must have
  std::vector<HeldTensor> held;    // params, states and step tensors
  std::vector<float*> steps;       // the states' "step" values (float32 CPU scalars); may be empty
  // One row per non-empty tensor, in list order, without the gradient stream.
  std::vector<TensorRow> base;
  std::vector<int64_t> base_source;  // per base row: the tensor's index in the lists
  std::vector<DType> base_param;     // per base row: param dtype
  std::vector<StateFormat> base_state;  // per base row: the states' format
  std::array<QuantTable, kMaxStreams> maps{};  // format 8: one map per state stream (table.h)
  std::vector<double> lr_mults, wd_mults, eps_mults;
  bool has_max = false;  // AdamW: max_exp_avg_sqs bound, so amsgrad steps can run
  std::vector<int64_t> sr_seeds;  // stochastic rounding of the param stores (prepare.h set_rounding)
  bool compensated = false;       // kahan_summation: the rows hold the compensations (table.h)

  // Per-step scratch and the grouping of the last step (reused while the keys are the same).
  std::vector<void*> grad_ptr;  // per base row
  std::vector<int> grad_aligned;
  std::vector<int> keys;
  std::vector<int> base_of;  // per tensor: its base row, or -1 (empty tensor)
  std::vector<double> before;
  int64_t chunk = 0;  // chunk size of `table`'s grouping; 0: none yet
  Table table;

  int64_t size() const { return n; }
  std::string op() const { return name; }
};

using Plan = c10::intrusive_ptr<BoundPlan>;

// A list of per-tensor multipliers bound with a plan; name nullptr: none (left empty).
struct BoundMults {
  const char* name;
  at::ArrayRef<double> values;
};

// Checks and keeps the lists (make_rows, stream 1 left for the gradients) and, unless ``steps``
// is nullptr, the step tensors (read_steps). ``lean``: format 8's block scales and maps and
// kahan_summation's compensations, as the per-call ops take them (table.h LeanLists), kept in
// the rows and held like the states.
inline Plan make_plan(const char* op, const std::array<Stream, kMaxStreams>& streams, const at::TensorList* steps,
                      BoundMults lr, BoundMults wd, BoundMults eps, const LeanLists& lean = {}) {
  auto p = c10::make_intrusive<BoundPlan>();
  p->name = op;
  const RowSet set = make_rows(op, streams, nullptr, 0, nullptr, lean);
  p->compensated = set.compensated;
  p->maps = set.maps;
  const at::TensorList params = streams[0].list;
  p->n = static_cast<int64_t>(params.size());
  if (set.device) p->device = *set.device;
  if (steps != nullptr) {
    read_steps(op, *steps, p->n);  // the checks; the values are read at every step
    for (const at::Tensor& s : *steps) p->steps.push_back(s.data_ptr<float>());
  }
  for (auto [m, dst] : {std::make_pair(lr, &p->lr_mults), std::make_pair(wd, &p->wd_mults),
                        std::make_pair(eps, &p->eps_mults)}) {
    if (m.name == nullptr) continue;
    check_mults(op, m.name, m.values, p->n);
    dst->assign(m.values.begin(), m.values.end());
  }
  p->params.assign(params.begin(), params.end());
  for (int s = 0; s < kMaxStreams; ++s) {
    if (streams[s].name == nullptr) continue;
    for (const at::Tensor& t : streams[s].list) p->held.emplace_back(t);
  }
  if (steps != nullptr) {
    for (const at::Tensor& s : *steps) p->held.emplace_back(s);
  }
  for (const at::TensorList* list : {&lean.absmax, &lean.maps}) {
    for (const at::Tensor& t : *list) p->held.emplace_back(t);
  }
  if (lean.compensations.has_value()) {
    for (const at::Tensor& c : *lean.compensations) p->held.emplace_back(c);
  }
  p->base = set.rows;
  p->base_source = set.sources;
  p->base_of.assign(static_cast<size_t>(p->n), -1);
  for (size_t r = 0; r < set.rows.size(); ++r) {
    p->base_param.push_back(key_param(set.keys[r]));
    p->base_state.push_back(key_state(set.keys[r]));
    p->base_of[set.sources[r]] = static_cast<int>(r);
  }
  p->grad_ptr.assign(p->base.size(), nullptr);
  p->grad_aligned.assign(p->base.size(), 1);
  p->before.assign(static_cast<size_t>(p->n), 0.0);
  return p;
}

// The checks of one step's gradients, in list order, before anything is written: false when a
// bound tensor changed since bind (the caller binds again), an error for a bad gradient.
// Records the gradients' addresses and dtypes in the plan's scratch.
inline bool check_grads(BoundPlan& p, const char* op, at::TensorList grads) {
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == p.n, op, ": ", grads.size(), " gradients for ", p.n,
              " bound parameters");
  for (const HeldTensor& h : p.held) {
    if (!h.unchanged()) return false;
  }
  for (int64_t i = 0; i < p.n; ++i) {
    const at::Tensor& g = grads[i];
    const at::Tensor& param = p.params[i];
    TORCH_CHECK(g.defined(), op, ": grads[", i, "] is undefined");
    TORCH_CHECK(g.layout() == at::kStrided && g.has_storage(), op, ": grads[", i, "] (", g.toString(),
                ") is not a dense tensor with storage");
    TORCH_CHECK(g.sizes() == param.sizes(), op, ": grads[", i, "] is a ", describe(g), " but params[", i,
                "] has shape ", param.sizes());
    check_tensor(op, "grads", i, g, p.device, "params", param.numel());
    check_grad_dtype(op, i, g, "params", param);
    const int b = p.base_of[i];
    if (b >= 0) {
      void* ptr = g.data_ptr();
      p.grad_ptr[b] = ptr;
      p.grad_aligned[b] = vector_aligned(ptr, g) ? 1 : 0;
    }
  }
  return true;
}

// The step counts before this step (for the scalars and ADOPT's split).
inline void read_before(BoundPlan& p) {
  for (size_t i = 0; i < p.steps.size(); ++i) p.before[i] = static_cast<double>(*p.steps[i]);
}

// The plan's table for this step's gradients: the last grouping with the gradient addresses
// filled in when every row keeps its key (gradient dtype, variant), else grouped anew.
// ``variant(i)`` as make_table's. Scalars are left to the caller.
template <class Variant>
void assemble(BoundPlan& p, at::TensorList grads, int64_t chunk, Variant&& variant) {
  const size_t nb = p.base.size();
  std::vector<int> keys(nb);
  for (size_t b = 0; b < nb; ++b) {
    const int64_t i = p.base_source[b];
    keys[b] = group_key(variant(i), p.base_param[b], storage_of(grads[i]), p.base_state[b]);
  }
  if (chunk == p.chunk && keys == p.keys) {
    for (size_t r = 0; r < p.table.rows.size(); ++r) {
      const int b = p.base_of[p.table.source[r]];
      TensorRow& row = p.table.rows[r];
      row.ptr[1] = p.grad_ptr[b];
      row.aligned = p.base[b].aligned & p.grad_aligned[b];
    }
    return;
  }
  std::vector<TensorRow> rows(p.base);
  for (size_t b = 0; b < nb; ++b) {
    rows[b].ptr[1] = p.grad_ptr[b];
    rows[b].aligned = p.base[b].aligned & p.grad_aligned[b];
  }
  p.table.device = p.device;
  p.table.compensated = p.compensated;
  p.table.maps = p.maps;
  group_rows(rows, p.base_source, keys, chunk, p.table);
  p.keys = std::move(keys);
  p.chunk = chunk;
}

inline void assemble(BoundPlan& p, at::TensorList grads, int64_t chunk) {
  assemble(p, grads, chunk, [](int64_t) { return 0; });
}

// The bound params' own gradients (param.grad()), for the *_bound_grads_ ops: no tensor list
// to build in Python or to convert per step.
inline std::vector<at::Tensor> param_grads(const BoundPlan& p, const char* op) {
  std::vector<at::Tensor> grads;
  grads.reserve(static_cast<size_t>(p.n));
  for (int64_t i = 0; i < p.n; ++i) {
    at::Tensor g = p.params[i].grad();
    TORCH_CHECK(g.defined(), op, ": params[", i, "].grad is None");
    grads.push_back(std::move(g));
  }
  return grads;
}

inline void bump_bound_steps(BoundPlan& p) {
  for (float* v : p.steps) *v = *v + 1.0f;
}

// A plan's stochastic-rounding seeds, checked as the per-call ops check theirs (prepare.h).
inline void keep_seeds(BoundPlan& p, at::IntArrayRef sr_seeds) {
  check_seeds(p.name.c_str(), sr_seeds, p.n);
  TORCH_CHECK(sr_seeds.empty() || !p.compensated, p.name,
              ": sr_seeds (stochastic_rounding) and compensations (kahan_summation) are two ways to store "
              "bfloat16 / float16 params: pass one");
  p.sr_seeds.assign(sr_seeds.begin(), sr_seeds.end());
}

// The bind ops (device independent: the step ops group the rows with their device's chunk).
inline Plan bind_adamw(at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                       at::TensorList max_exp_avg_sqs, at::TensorList state_steps, at::ArrayRef<double> lr_mults,
                       at::ArrayRef<double> wd_mults, at::ArrayRef<double> eps_mults,
                       at::IntArrayRef sr_seeds, OptTensors absmax, OptTensors maps, OptTensors compensations) {
  // Without max_exp_avg_sqs the plan runs amsgrad=False steps only.
  const bool has_max = !max_exp_avg_sqs.empty() || params.empty();
  Plan p = make_plan("adamw_",
                     {Stream{params, "params"}, Stream{}, Stream{exp_avgs, "exp_avgs"},
                      Stream{exp_avg_sqs, "exp_avg_sqs"},
                      has_max ? Stream{max_exp_avg_sqs, "max_exp_avg_sqs"} : Stream{}},
                     &state_steps, {"lr_mults", lr_mults}, {"wd_mults", wd_mults}, {"eps_mults", eps_mults},
                     lean_lists(absmax, maps, compensations));
  p->has_max = has_max;
  keep_seeds(*p, sr_seeds);
  return p;
}

inline Plan bind_adopt(at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                       at::TensorList state_steps, at::ArrayRef<double> lr_mults, at::ArrayRef<double> wd_mults,
                       at::ArrayRef<double> eps_mults,
                       at::IntArrayRef sr_seeds, OptTensors absmax, OptTensors maps, OptTensors compensations) {
  Plan p = make_plan("adopt_",
                   {Stream{params, "params"}, Stream{}, Stream{exp_avgs, "exp_avgs"},
                    Stream{exp_avg_sqs, "exp_avg_sqs"}, Stream{}},
                   &state_steps, {"lr_mults", lr_mults}, {"wd_mults", wd_mults}, {"eps_mults", eps_mults},
                   lean_lists(absmax, maps, compensations));
  keep_seeds(*p, sr_seeds);
  return p;
}

// LAMB has no decay multiplier (the decay is inside u).
inline Plan bind_lamb(at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                      at::TensorList state_steps, at::ArrayRef<double> lr_mults, at::ArrayRef<double> eps_mults,
                       at::IntArrayRef sr_seeds, OptTensors absmax, OptTensors maps, OptTensors compensations) {
  Plan p = make_plan("lamb_",
                   {Stream{params, "params"}, Stream{}, Stream{exp_avgs, "exp_avgs"},
                    Stream{exp_avg_sqs, "exp_avg_sqs"}, Stream{}},
                   &state_steps, {"lr_mults", lr_mults}, {nullptr, {}}, {"eps_mults", eps_mults},
                   lean_lists(absmax, maps, compensations));
  keep_seeds(*p, sr_seeds);
  return p;
}

inline Plan bind_sophia(at::TensorList params, at::TensorList exp_avgs, at::TensorList hessians,
                        at::TensorList state_steps, at::ArrayRef<double> lr_mults, at::ArrayRef<double> wd_mults,
                       at::IntArrayRef sr_seeds, OptTensors absmax, OptTensors maps, OptTensors compensations) {
  Plan p = make_plan("sophia_",
                   {Stream{params, "params"}, Stream{}, Stream{exp_avgs, "exp_avgs"}, Stream{hessians, "hessians"},
                    Stream{}},
                   &state_steps, {"lr_mults", lr_mults}, {"wd_mults", wd_mults}, {nullptr, {}},
                   lean_lists(absmax, maps, compensations));
  keep_seeds(*p, sr_seeds);
  return p;
}

// The Hessian EMA: params are bound for the gradients' shapes (the kernel does not read them);
// no step counts.
inline Plan bind_sophia_hessian(at::TensorList params, at::TensorList hessians, OptTensors absmax, OptTensors maps) {
  return make_plan("sophia_hessian_",
                   {Stream{params, "params"}, Stream{}, Stream{hessians, "hessians"}, Stream{}, Stream{}}, nullptr,
                   {nullptr, {}}, {nullptr, {}}, {nullptr, {}}, lean_lists(absmax, maps));
}

}  // namespace binding
}  // namespace mupopt
