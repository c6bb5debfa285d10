// The per-call optimizer ops, written once for both devices (bindings.cpp: CPU, bindings_cuda.cpp:
// CUDA). Every op does the same five things: check its lists and build the launch table with each
// tensor's scalars (prepare.h), check the GradScaler arguments, stop when found_inf is set (nothing
// changes, the step counts included), bump the step counts, run its kernel on each launch group.
// What differs per device is a policy ``Dev``:
//
//   struct Dev {
//     static constexpr int64_t kChunk;            // elements per chunk of the launch table
//     struct Ctx { bool skip; ... };               // the call's gradient handling (and device state)
//     static Ctx begin(const char* op, const Table& t, bool maximize, const OptTensor& grad_scale,
//                      const OptTensor& found_inf, const OptTensors& absmax, bool host_skip);
//                                                  // checks (nothing written yet); skip: found_inf is
//                                                  // set (read on the host where host_skip; the
//                                                  // kernels also skip on the device)
//     template <class Fn> static void each(const char* op, Table& t, Ctx& ctx, Fn&& fn);
//                                                  // fn(launch, group) for every launch group
//     // the kernels, one per Op family (cpu/ops.h, cuda/ops.h):
//     static void adamw(const Launch&, const Group&, const AdamWHyper&, bool amsgrad, Ctx&); ...
//   };
//
// A new optimizer is one function here and one kernel per device; a new state format changes
// neither (the storage layer: csrc/include/mupopt/storage.h).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include "prepare.h"
#include "table.h"

namespace mupopt {
namespace binding {

using OptTensor = c10::optional<at::Tensor>;

// begin, skip, bump, each: the common tail of the optimizer ops. ``bump``: the op increments the
// step counts; without step counts to guard (the Hessian EMA) found_inf need not be read on the
// host (``host_skip`` false: the kernels skip on the device).
template <class Dev, class Fn>
void run_step(const char* op, Table& t, at::TensorList steps, bool bump, bool maximize, const OptTensor& grad_scale,
              const OptTensor& found_inf, const OptTensors& absmax, Fn&& fn, bool host_skip = true) {
  typename Dev::Ctx ctx = Dev::begin(op, t, maximize, grad_scale, found_inf, absmax, host_skip);
  if (ctx.skip) return;
  if (bump) bump_steps(steps);
  Dev::each(op, t, ctx, [&](const auto& launch, const Group& g) { return fn(launch, g, ctx); });
}

template <class Dev>
void adamw_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList max_exp_avg_sqs, at::TensorList state_steps, at::ArrayRef<double> lr_mults,
                at::ArrayRef<double> wd_mults, at::ArrayRef<double> eps_mults, double lr, double beta1, double beta2,
                double weight_decay, double eps, bool amsgrad, bool maximize, const OptTensor& grad_scale,
                const OptTensor& found_inf, at::IntArrayRef sr_seeds, OptTensors absmax, OptTensors maps,
                OptTensors compensations) {
  Table t = prepare_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr_mults, wd_mults,
                          eps_mults, lr, beta1, beta2, weight_decay, eps, amsgrad, Dev::kChunk, sr_seeds,
                          lean_lists(absmax, maps, compensations));
  const AdamWHyper h = make_adamw_hyper(beta1, beta2);
  run_step<Dev>("adamw_", t, state_steps, true, maximize, grad_scale, found_inf, absmax,
                [&](const auto& l, const Group& g, auto& ctx) { return Dev::adamw(l, g, h, amsgrad, ctx); });
}

// Launch groups of variant 0 hold the tensors at their first step (prepare_adopt).
template <class Dev>
void adopt_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList state_steps, at::ArrayRef<double> lr_mults, at::ArrayRef<double> wd_mults,
                at::ArrayRef<double> eps_mults, double lr, double beta1, double beta2, double weight_decay, double eps,
                bool maximize, const OptTensor& grad_scale, const OptTensor& found_inf, at::IntArrayRef sr_seeds,
                OptTensors absmax, OptTensors maps, OptTensors compensations) {
  Table t = prepare_adopt(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr_mults, wd_mults, eps_mults, lr,
                          weight_decay, eps, Dev::kChunk, sr_seeds, lean_lists(absmax, maps, compensations));
  const AdoptHyper h = make_adopt_hyper(beta1, beta2);
  run_step<Dev>("adopt_", t, state_steps, true, maximize, grad_scale, found_inf, absmax,
                [&](const auto& l, const Group& g, auto& ctx) { return Dev::adopt(l, g, h, g.variant == 0, ctx); });
}

inline LambHyper lamb_hyper(double beta1, double beta2, double weight_decay, const c10::optional<double>& clamp) {
  return make_lamb_hyper(beta1, beta2, weight_decay, clamp.has_value(), clamp.value_or(0.0));
}

template <class Dev>
void lamb_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               at::TensorList state_steps, at::ArrayRef<double> lr_mults, at::ArrayRef<double> eps_mults, double lr,
               double beta1, double beta2, double weight_decay, double eps, c10::optional<double> clamp_value,
               bool maximize, const OptTensor& grad_scale, const OptTensor& found_inf, at::IntArrayRef sr_seeds,
               OptTensors absmax, OptTensors maps, OptTensors compensations) {
  Table t = prepare_lamb(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr_mults, eps_mults, lr, beta1, beta2,
                         eps, Dev::kChunk, sr_seeds, "lamb_", false, lean_lists(absmax, maps, compensations));
  const LambHyper h = lamb_hyper(beta1, beta2, weight_decay, clamp_value);
  run_step<Dev>("lamb_", t, state_steps, true, maximize, grad_scale, found_inf, absmax,
                [&](const auto& l, const Group& g, auto& ctx) { return Dev::lamb(l, g, h, ctx); });
}

// The split form of lamb_ (csrc/include/mupopt/lamb.h), for tensors whose norms the caller
// reduces between the two calls (shards of one tensor on several ranks). Same arguments as
// lamb_; lamb_apply_ must follow with the same lists and the reduced sums. Returns float64
// [N, 2] on the tensors' device (zeros when found_inf is set).
template <class Dev>
at::Tensor lamb_partials_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                              at::TensorList exp_avg_sqs, at::TensorList state_steps, at::ArrayRef<double> lr_mults,
                              at::ArrayRef<double> eps_mults, double lr, double beta1, double beta2,
                              double weight_decay, double eps, c10::optional<double> clamp_value, bool maximize,
                              const OptTensor& grad_scale, const OptTensor& found_inf, at::IntArrayRef sr_seeds,
                              OptTensors absmax, OptTensors maps, OptTensors compensations) {
  const char* op = "lamb_partials_";
  Table t = prepare_lamb(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr_mults, eps_mults, lr, beta1, beta2,
                         eps, Dev::kChunk, sr_seeds, op, false, lean_lists(absmax, maps, compensations));
  const auto device = t.device.value_or(params.empty() ? at::Device(at::kCPU) : params[0].device());
  at::Tensor sums = at::zeros({static_cast<int64_t>(params.size()), 2},
                              at::TensorOptions().dtype(at::kDouble).device(device));
  const LambHyper h = lamb_hyper(beta1, beta2, weight_decay, clamp_value);
  run_step<Dev>(op, t, state_steps, true, maximize, grad_scale, found_inf, absmax,
                [&](const auto& l, const Group& g, auto& ctx) { return Dev::lamb_partials(l, g, h, ctx, sums); });
  return sums;
}

// The step counts hold this step's values already (lamb_partials_ bumped them).
template <class Dev>
void lamb_apply_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                     at::TensorList state_steps, at::ArrayRef<double> lr_mults, at::ArrayRef<double> eps_mults,
                     const at::Tensor& sums, double lr, double beta1, double beta2, double weight_decay, double eps,
                     c10::optional<double> clamp_value, bool maximize, const OptTensor& grad_scale,
                     const OptTensor& found_inf, at::IntArrayRef sr_seeds, OptTensors absmax, OptTensors maps,
                     OptTensors compensations) {
  const char* op = "lamb_apply_";
  Table t = prepare_lamb(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr_mults, eps_mults, lr, beta1, beta2,
                         eps, Dev::kChunk, sr_seeds, op, /*steps_bumped=*/true, lean_lists(absmax, maps, compensations));
  const at::Tensor reduced = check_lamb_sums(op, sums, static_cast<int64_t>(params.size()), t.device);
  const LambHyper h = lamb_hyper(beta1, beta2, weight_decay, clamp_value);
  run_step<Dev>(op, t, state_steps, false, maximize, grad_scale, found_inf, absmax,
                [&](const auto& l, const Group& g, auto& ctx) { return Dev::lamb_apply(l, g, h, ctx, reduced); });
}

template <class Dev>
void sophia_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList hessians,
                 at::TensorList state_steps, at::ArrayRef<double> lr_mults, at::ArrayRef<double> wd_mults, double lr,
                 double beta1, double rho, double bs, double weight_decay, bool maximize, const OptTensor& grad_scale,
                 const OptTensor& found_inf, at::IntArrayRef sr_seeds, OptTensors absmax, OptTensors maps,
                 OptTensors compensations) {
  Table t = prepare_sophia(params, grads, exp_avgs, hessians, state_steps, lr_mults, wd_mults, lr, weight_decay,
                           Dev::kChunk, sr_seeds, lean_lists(absmax, maps, compensations));
  const SophiaHyper h = make_sophia_hyper(beta1, 0.0, rho * bs);  // rho*bs: the reference's float64 product
  run_step<Dev>("sophia_", t, state_steps, true, maximize, grad_scale, found_inf, absmax,
                [&](const auto& l, const Group& g, auto& ctx) { return Dev::sophia(l, g, h, ctx); });
}

// The Hessian EMA: no step counts, so found_inf is left to the kernels.
template <class Dev>
void sophia_hessian_step(at::TensorList grads, at::TensorList hessians, double beta2, const OptTensor& grad_scale,
                         const OptTensor& found_inf, OptTensors absmax, OptTensors maps) {
  const char* op = "sophia_hessian_";
  Table t = make_table(op, {Stream{}, Stream{grads, "grads"}, Stream{hessians, "hessians"}, Stream{}, Stream{}},
                       nullptr, 0, Dev::kChunk, nullptr, lean_lists(absmax, maps));
  const SophiaHyper h = make_sophia_hyper(0.0, beta2, 0.0);
  run_step<Dev>(
      op, t, at::TensorList(), false, false, grad_scale, found_inf, absmax,
      [&](const auto& l, const Group& g, auto& ctx) { return Dev::sophia_hessian(l, g, h, ctx); }, /*host_skip=*/false);
}

// The kernels of the per-call optimizer ops on device Dev (TORCH_LIBRARY_IMPL of bindings.cpp,
// bindings_cuda.cpp): one list of names for both devices.
template <class Dev>
void impl_step_ops(torch::Library& m) {
  m.impl("adamw_", &adamw_step<Dev>);
  m.impl("adopt_", &adopt_step<Dev>);
  m.impl("lamb_", &lamb_step<Dev>);
  m.impl("lamb_partials_", &lamb_partials_step<Dev>);
  m.impl("lamb_apply_", &lamb_apply_step<Dev>);
  m.impl("sophia_", &sophia_step<Dev>);
  m.impl("sophia_hessian_", &sophia_hessian_step<Dev>);
}

}  // namespace binding
}  // namespace mupopt
