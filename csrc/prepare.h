// Host side of the optimizer ops, shared by the CPU and CUDA bindings: check the lists, build
// the launch table, and form every tensor's scalars from its step count and muP multipliers.
//
// Each scalar is formed in float64 with the reference backend's own expression (same operands,
// same order: `-lr * lr_mult / (1 - beta1**t)` is ((-lr) * lr_mult) / (1 - pow(beta1, t)), and
// CPython's float ** calls the same libm pow) and kept in float64 in the row; the loops round it
// once to their compute type: to float32 for float32/16-bit storage, the rounding torch applies
// to a Python scalar used with a float32 tensor, and not at all for float64 storage. So the
// kernels see the very constants the reference's ATen calls see.
//
// Step counts stay where torch keeps them (float32 CPU scalars in the states); the op bumps
// them (step += 1 in float32, as the reference) unless found_inf is set, so one call either
// does the whole step or nothing. Nothing is modified before every check has passed.
#pragma once

#include <cmath>
#include <vector>

#include "mupopt/adamw.h"
#include "mupopt/adopt.h"
#include "mupopt/lamb.h"
#include "mupopt/sophia.h"
#include "table.h"

namespace mupopt {
namespace binding {

using at::ArrayRef;
using at::TensorList;

// Stochastic rounding of the param stores (storage.h, mupopt/storage.py). ``seeds``: empty
// (round to nearest) or one per tensor, each the tensor's state["sr_seed"] in [0, 2^32).
inline void check_seeds(const char* op, ArrayRef<int64_t> seeds, int64_t n) {
  TORCH_CHECK(seeds.empty() || static_cast<int64_t>(seeds.size()) == n, op, ": sr_seeds has ", seeds.size(),
              " values for ", n, " tensors (none: round to nearest)");
  for (size_t i = 0; i < seeds.size(); ++i) {
    TORCH_CHECK(seeds[i] >= 0 && seeds[i] < (int64_t{1} << 32), op, ": sr_seeds[", i, "] = ", seeds[i],
                " is not a 32-bit seed");
  }
}

// Each row's key from its seed and the step count its param is stored under: ``counts`` before
// this step's increment, or after it when ``bumped`` (lamb_apply_).
inline void set_rounding(Table& t, ArrayRef<int64_t> seeds, const double* counts, bool bumped = false) {
  t.stochastic = !seeds.empty();
  if (!t.stochastic) return;
  for (size_t r = 0; r < t.rows.size(); ++r) {
    const int64_t i = t.source[r];
    const double step = bumped ? counts[i] : next_step(counts[i]);
    t.rows[r].sr_key = sr_step_key(static_cast<uint32_t>(seeds[i]), static_cast<uint32_t>(static_cast<int64_t>(step)));
  }
}

// Stochastic rounding and kahan_summation are two param formats; a call takes one (the
// optimizers refuse both together before calling: mupopt/optim/_base.py).
inline void check_one_param_format(const char* op, const Table& t) {
  TORCH_CHECK(!(t.stochastic && t.compensated), op,
              ": sr_seeds (stochastic_rounding) and compensations (kahan_summation) are two ways to store "
              "bfloat16 / float16 params: pass one");
}

// Per-tensor scalars, shared by the per-call ops (prepare_* below) and the bound plans
// (bound.h). ``before[i]``: tensor i's step count before this step; the multipliers per tensor.
// Rows are visited in table order, where neighbours usually share their step count, so the
// bias corrections are formed once per distinct count (same expression, same value).

inline void adamw_scalars(Table& t, const double* before, const double* lr_mults, const double* wd_mults,
                          const double* eps_mults, double lr, double beta1, double beta2, double weight_decay,
                          double eps) {
  using S = AdamWScalars;
  double last = -1.0, bc1 = 0.0, bc2_sqrt = 0.0;
  for (size_t r = 0; r < t.rows.size(); ++r) {
    const int64_t i = t.source[r];
    const double step = next_step(before[i]);
    if (step != last) {
      last = step;
      bc1 = 1.0 - std::pow(beta1, step);
      bc2_sqrt = std::sqrt(1.0 - std::pow(beta2, step));
    }
    double* s = t.rows[r].scalar;
    s[S::kDecay] = 1.0 - lr * weight_decay * wd_mults[i];
    s[S::kStepSize] = -lr * lr_mults[i] / bc1;
    s[S::kBc2Sqrt] = bc2_sqrt;
    s[S::kEps] = eps * eps_mults[i];
  }
}

// ADOPT's launch variant: 0 for a tensor at its first step (s == 0: v = g*g only), else 1.
inline int adopt_variant(double before) { return before == 0.0 ? 0 : 1; }

inline void adopt_scalars(Table& t, const double* before, const double* lr_mults, const double* wd_mults,
                          const double* eps_mults, double lr, double weight_decay, double eps) {
  using S = AdoptScalars;
  double last = -1.0, clip = 0.0;
  for (size_t r = 0; r < t.rows.size(); ++r) {
    const int64_t i = t.source[r];
    const double s_before = before[i];  // ADOPT's s: the count before this step
    if (s_before != last) {
      last = s_before;
      clip = std::pow(s_before, 0.25);
    }
    double* s = t.rows[r].scalar;
    s[S::kFirst] = s_before == 0.0 ? 1.0 : 0.0;
    s[S::kDecayAlpha] = -lr * weight_decay * wd_mults[i];
    s[S::kStepAlpha] = -lr * lr_mults[i];
    s[S::kEps] = eps * eps_mults[i];
    s[S::kClip] = clip;
  }
}

// ``steps_bumped``: ``before`` already holds this step's counts (lamb_apply_, after
// lamb_partials_ incremented them), so the bias corrections use them as they are.
inline void lamb_scalars(Table& t, const double* before, const double* lr_mults, const double* eps_mults, double lr,
                         double beta1, double beta2, double eps, bool steps_bumped = false) {
  using S = LambScalars;
  double last = -1.0, bc1 = 0.0, bc2 = 0.0;
  for (size_t r = 0; r < t.rows.size(); ++r) {
    const int64_t i = t.source[r];
    const double step = steps_bumped ? before[i] : next_step(before[i]);
    if (step != last) {
      last = step;
      bc1 = 1.0 - std::pow(beta1, step);
      bc2 = 1.0 - std::pow(beta2, step);
    }
    double* s = t.rows[r].scalar;
    s[S::kBc1] = bc1;
    s[S::kBc2] = bc2;
    s[S::kEps] = eps * eps_mults[i];
    s[S::kAlpha] = -lr * lr_mults[i];
    s[S::kTrust] = 1.0;  // set by the norm pass
  }
}

inline void sophia_scalars(Table& t, const double* lr_mults, const double* wd_mults, double lr, double weight_decay) {
  using S = SophiaScalars;
  for (size_t r = 0; r < t.rows.size(); ++r) {
    const int64_t i = t.source[r];
    double* s = t.rows[r].scalar;
    s[S::kDecay] = 1.0 - lr * weight_decay * wd_mults[i];
    s[S::kAlpha] = -lr * lr_mults[i];
  }
}

inline Table prepare_adamw(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                           TensorList max_exp_avg_sqs, TensorList steps, ArrayRef<double> lr_mults,
                           ArrayRef<double> wd_mults, ArrayRef<double> eps_mults, double lr, double beta1,
                           double beta2, double weight_decay, double eps, bool amsgrad, int64_t chunk,
                           ArrayRef<int64_t> sr_seeds, const LeanLists& lean = {}) {
  const char* op = "adamw_";
  const int64_t n = static_cast<int64_t>(params.size());
  const std::vector<double> before = read_steps(op, steps, n);
  check_seeds(op, sr_seeds, n);
  check_mults(op, "lr_mults", lr_mults, n);
  check_mults(op, "wd_mults", wd_mults, n);
  check_mults(op, "eps_mults", eps_mults, n);
  Table t = make_table(op,
                       {Stream{params, "params"}, Stream{grads, "grads"}, Stream{exp_avgs, "exp_avgs"},
                        Stream{exp_avg_sqs, "exp_avg_sqs"},
                        amsgrad ? Stream{max_exp_avg_sqs, "max_exp_avg_sqs"} : Stream{}},
                       nullptr, AdamWScalars::kCount, chunk, nullptr, lean);
  adamw_scalars(t, before.data(), lr_mults.data(), wd_mults.data(), eps_mults.data(), lr, beta1, beta2,
                weight_decay, eps);
  set_rounding(t, sr_seeds, before.data());
  check_one_param_format(op, t);
  return t;
}

// Launch groups of variant 0 hold the tensors at their first step (s == 0: v = g*g only).
inline Table prepare_adopt(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                           TensorList steps, ArrayRef<double> lr_mults, ArrayRef<double> wd_mults,
                           ArrayRef<double> eps_mults, double lr, double weight_decay, double eps, int64_t chunk,
                           ArrayRef<int64_t> sr_seeds, const LeanLists& lean = {}) {
  const char* op = "adopt_";
  const int64_t n = static_cast<int64_t>(params.size());
  const std::vector<double> before = read_steps(op, steps, n);
  check_seeds(op, sr_seeds, n);
  check_mults(op, "lr_mults", lr_mults, n);
  check_mults(op, "wd_mults", wd_mults, n);
  check_mults(op, "eps_mults", eps_mults, n);
  Table t = make_table(op,
                       {Stream{params, "params"}, Stream{grads, "grads"}, Stream{exp_avgs, "exp_avgs"},
                        Stream{exp_avg_sqs, "exp_avg_sqs"}, Stream{}},
                       nullptr, AdoptScalars::kCount, chunk, [&](int64_t i) { return adopt_variant(before[i]); },
                       lean);
  adopt_scalars(t, before.data(), lr_mults.data(), wd_mults.data(), eps_mults.data(), lr, weight_decay, eps);
  set_rounding(t, sr_seeds, before.data());
  check_one_param_format(op, t);
  return t;
}

// ``steps_bumped``: the step counts already hold this step's value (lamb_apply_, after
// lamb_partials_ incremented them), so the bias corrections use them as they are.
inline Table prepare_lamb(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                          TensorList steps, ArrayRef<double> lr_mults, ArrayRef<double> eps_mults, double lr,
                          double beta1, double beta2, double eps, int64_t chunk, ArrayRef<int64_t> sr_seeds,
                          const char* op = "lamb_", bool steps_bumped = false, const LeanLists& lean = {}) {
  const int64_t n = static_cast<int64_t>(params.size());
  const std::vector<double> before = read_steps(op, steps, n);
  check_seeds(op, sr_seeds, n);
  check_mults(op, "lr_mults", lr_mults, n);
  check_mults(op, "eps_mults", eps_mults, n);
  Table t = make_table(op,
                       {Stream{params, "params"}, Stream{grads, "grads"}, Stream{exp_avgs, "exp_avgs"},
                        Stream{exp_avg_sqs, "exp_avg_sqs"}, Stream{}},
                       nullptr, LambScalars::kCount, chunk, nullptr, lean);
  lamb_scalars(t, before.data(), lr_mults.data(), eps_mults.data(), lr, beta1, beta2, eps, steps_bumped);
  set_rounding(t, sr_seeds, before.data(), steps_bumped);
  check_one_param_format(op, t);
  return t;
}

inline Table prepare_sophia(TensorList params, TensorList grads, TensorList exp_avgs, TensorList hessians,
                            TensorList steps, ArrayRef<double> lr_mults, ArrayRef<double> wd_mults, double lr,
                            double weight_decay, int64_t chunk, ArrayRef<int64_t> sr_seeds,
                            const LeanLists& lean = {}) {
  const char* op = "sophia_";
  const int64_t n = static_cast<int64_t>(params.size());
  // Sophia's update does not depend on the count; stochastic rounding's key does.
  const std::vector<double> before = read_steps(op, steps, n);
  check_seeds(op, sr_seeds, n);
  check_mults(op, "lr_mults", lr_mults, n);
  check_mults(op, "wd_mults", wd_mults, n);
  Table t = make_table(op,
                       {Stream{params, "params"}, Stream{grads, "grads"}, Stream{exp_avgs, "exp_avgs"},
                        Stream{hessians, "hessians"}, Stream{}},
                       nullptr, SophiaScalars::kCount, chunk, nullptr, lean);
  sophia_scalars(t, lr_mults.data(), wd_mults.data(), lr, weight_decay);
  set_rounding(t, sr_seeds, before.data());
  check_one_param_format(op, t);
  return t;
}

}  // namespace binding
}  // namespace mupopt
