// Host side of the optimizer ops, shared by the CPU and CUDA bindings: check the lists, build
// the launch table, and form every tensor's scalars from its step count and muP multipliers.
//
// Each scalar is formed in float64 with the reference backend's own expression (same operands,
// same order: `-lr * lr_mult / (1 - beta1**t)` is ((-lr) * lr_mult) / (1 - pow(beta1, t)), and
// CPython's float ** calls the same libm pow) and rounded once to float32, the rounding torch
// applies to a Python scalar used with a float32 tensor. So the kernels see the very float32
// constants the reference's ATen calls see.
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

inline Table prepare_adamw(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                           TensorList max_exp_avg_sqs, TensorList steps, ArrayRef<double> lr_mults,
                           ArrayRef<double> wd_mults, ArrayRef<double> eps_mults, double lr, double beta1,
                           double beta2, double weight_decay, double eps, bool amsgrad, int64_t chunk) {
  const char* op = "adamw_";
  const int64_t n = static_cast<int64_t>(params.size());
  const std::vector<double> before = read_steps(op, steps, n);
  check_mults(op, "lr_mults", lr_mults, n);
  check_mults(op, "wd_mults", wd_mults, n);
  check_mults(op, "eps_mults", eps_mults, n);
  Table t = make_table(op,
                       {Stream{params, "params"}, Stream{grads, "grads"}, Stream{exp_avgs, "exp_avgs"},
                        Stream{exp_avg_sqs, "exp_avg_sqs"},
                        amsgrad ? Stream{max_exp_avg_sqs, "max_exp_avg_sqs"} : Stream{}},
                       nullptr, AdamWScalars::kCount, chunk);
  using S = AdamWScalars;
  for (size_t r = 0; r < t.rows.size(); ++r) {
    const int64_t i = t.source[r];
    const double step = next_step(before[i]);
    float* s = t.rows[r].scalar;
    s[S::kDecay] = static_cast<float>(1.0 - lr * weight_decay * wd_mults[i]);
    s[S::kStepSize] = static_cast<float>(-lr * lr_mults[i] / (1.0 - std::pow(beta1, step)));
    s[S::kBc2Sqrt] = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, step)));
    s[S::kEps] = static_cast<float>(eps * eps_mults[i]);
  }
  return t;
}

// Launch groups of variant 0 hold the tensors at their first step (s == 0: v = g*g only).
inline Table prepare_adopt(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                           TensorList steps, ArrayRef<double> lr_mults, ArrayRef<double> wd_mults,
                           ArrayRef<double> eps_mults, double lr, double weight_decay, double eps, int64_t chunk) {
  const char* op = "adopt_";
  const int64_t n = static_cast<int64_t>(params.size());
  const std::vector<double> before = read_steps(op, steps, n);
  check_mults(op, "lr_mults", lr_mults, n);
  check_mults(op, "wd_mults", wd_mults, n);
  check_mults(op, "eps_mults", eps_mults, n);
  Table t = make_table(op,
                       {Stream{params, "params"}, Stream{grads, "grads"}, Stream{exp_avgs, "exp_avgs"},
                        Stream{exp_avg_sqs, "exp_avg_sqs"}, Stream{}},
                       nullptr, AdoptScalars::kCount, chunk, [&](int64_t i) { return before[i] == 0.0 ? 0 : 1; });
  using S = AdoptScalars;
  for (size_t r = 0; r < t.rows.size(); ++r) {
    const int64_t i = t.source[r];
    const double s_before = before[i];  // ADOPT's s: the count before this step
    float* s = t.rows[r].scalar;
    s[S::kFirst] = s_before == 0.0 ? 1.0f : 0.0f;
    s[S::kDecayAlpha] = static_cast<float>(-lr * weight_decay * wd_mults[i]);
    s[S::kStepAlpha] = static_cast<float>(-lr * lr_mults[i]);
    s[S::kEps] = static_cast<float>(eps * eps_mults[i]);
    s[S::kClip] = static_cast<float>(std::pow(s_before, 0.25));
  }
  return t;
}

// ``steps_bumped``: the step counts already hold this step's value (lamb_apply_, after
// lamb_partials_ incremented them), so the bias corrections use them as they are.
inline Table prepare_lamb(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                          TensorList steps, ArrayRef<double> lr_mults, ArrayRef<double> eps_mults, double lr,
                          double beta1, double beta2, double eps, int64_t chunk, const char* op = "lamb_",
                          bool steps_bumped = false) {
  const int64_t n = static_cast<int64_t>(params.size());
  const std::vector<double> before = read_steps(op, steps, n);
  check_mults(op, "lr_mults", lr_mults, n);
  check_mults(op, "eps_mults", eps_mults, n);
  Table t = make_table(op,
                       {Stream{params, "params"}, Stream{grads, "grads"}, Stream{exp_avgs, "exp_avgs"},
                        Stream{exp_avg_sqs, "exp_avg_sqs"}, Stream{}},
                       nullptr, LambScalars::kCount, chunk);
  using S = LambScalars;
  for (size_t r = 0; r < t.rows.size(); ++r) {
    const int64_t i = t.source[r];
    const double step = steps_bumped ? before[i] : next_step(before[i]);
    float* s = t.rows[r].scalar;
    s[S::kBc1] = static_cast<float>(1.0 - std::pow(beta1, step));
    s[S::kBc2] = static_cast<float>(1.0 - std::pow(beta2, step));
    s[S::kEps] = static_cast<float>(eps * eps_mults[i]);
    s[S::kAlpha] = static_cast<float>(-lr * lr_mults[i]);
    s[S::kTrust] = 1.0f;  // set by the norm pass
  }
  return t;
}

inline Table prepare_sophia(TensorList params, TensorList grads, TensorList exp_avgs, TensorList hessians,
                            TensorList steps, ArrayRef<double> lr_mults, ArrayRef<double> wd_mults, double lr,
                            double weight_decay, int64_t chunk) {
  const char* op = "sophia_";
  const int64_t n = static_cast<int64_t>(params.size());
  read_steps(op, steps, n);  // checked; Sophia's update does not depend on the count
  check_mults(op, "lr_mults", lr_mults, n);
  check_mults(op, "wd_mults", wd_mults, n);
  Table t = make_table(op,
                       {Stream{params, "params"}, Stream{grads, "grads"}, Stream{exp_avgs, "exp_avgs"},
                        Stream{hessians, "hessians"}, Stream{}},
                       nullptr, SophiaScalars::kCount, chunk);
  using S = SophiaScalars;
  for (size_t r = 0; r < t.rows.size(); ++r) {
    const int64_t i = t.source[r];
    float* s = t.rows[r].scalar;
    s[S::kDecay] = static_cast<float>(1.0 - lr * weight_decay * wd_mults[i]);
    s[S::kAlpha] = static_cast<float>(-lr * lr_mults[i]);
  }
  return t;
}

}  // namespace binding
}  // namespace mupopt
