// TORCH_LIBRARY_IMPL(mupopt, CUDA): the CUDA kernels of the ops defined in bindings.cpp.
//
// Per call: the launch table is built on the host (table.h), copied to the device with one
// pinned, non-blocking copy (the caching host allocator keeps the pinned buffer until the copy
// has run; the device copy is freed in stream order after the kernels that read it), then one
// launch per dtype pair on the current stream. Format 8 (state_bits=8): the op's map tables are
// CPU tensors, as for the CPU ops (mupopt/kernels/cpp/ops.py hands both the same arguments), and
// travel to the device in that same copy, behind the rows. grad_scale and found_inf are read by the kernels
// on the device; found_inf is also read once on the host (a sync, only when passed) because the
// step counts it guards live on the host.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstring>

#include "cuda/ops.h"
#include "prepare.h"
#include "step.h"
#include "table.h"

namespace mupopt {
namespace binding {
namespace {

using at::ArrayRef;
using at::Tensor;
using at::TensorList;

// Format 8's tables as the kernels copy them into shared memory: every distinct table of a call
// together at most this size. The dynamic maps take 46.5 KiB (signed 22.9 + unsigned 23.7;
// mupopt/kernels/cpp/ops.py map_table); 96 KiB stays under the opt-in limit of every GPU since
// sm_80 (99 KiB on sm_86 / sm_89, 163 KiB sm_80, 227 KiB sm_90).
constexpr int64_t kMaxMapBytes = 96 * 1024;

// A call's launch table on the device: its rows and, for format 8, its map tables (each distinct
// table once: AdamW's exp_avg_sq and max_exp_avg_sq share the unsigned map) behind them, in one
// pinned host buffer copied with one non-blocking copy. ``device`` is undefined when the table
// has no rows.
struct Upload {
  Tensor device;
  DeviceMaps maps;
};

Upload upload(const char* op, const Table& t) {
  Upload u;
  if (t.rows.empty()) return u;
  // Where each stream's table goes among the tables (in 4-byte words) and its header; size[s]:
  // the words to copy for stream s, 0 where an earlier stream has the same table.
  int64_t words = 0;
  std::array<int64_t, kMaxStreams> size{};
  for (int s = 0; s < kMaxStreams; ++s) {
    const QuantTable& q = t.maps[s];
    if (q.value == nullptr) continue;
    u.maps.lo[s] = q.lo;
    u.maps.count[s] = q.count;
    int same = -1;
    for (int r = 0; r < s; ++r) {
      if (t.maps[r].value == q.value) same = r;
    }
    if (same >= 0) {
      u.maps.offset[s] = u.maps.offset[same];
      continue;
    }
    u.maps.offset[s] = static_cast<int32_t>(words);
    size[s] = kQuantHeader + 2 * static_cast<int64_t>(q.count);
    words += size[s];
  }
  TORCH_CHECK(words * 4 <= kMaxMapBytes, op, ": the state_bits=8 map tables take ", words * 4,
              " bytes; the CUDA kernels hold them in shared memory, at most ", kMaxMapBytes);
  const int64_t row_bytes = static_cast<int64_t>(t.rows.size() * sizeof(TensorRow));
  const int64_t map_at = (row_bytes + 15) / 16 * 16;  // 16-byte aligned tables
  const int64_t bytes = words > 0 ? map_at + words * 4 : row_bytes;
  Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  auto* h = static_cast<uint8_t*>(host.data_ptr());
  std::memcpy(h, t.rows.data(), static_cast<size_t>(row_bytes));
  for (int s = 0; s < kMaxStreams; ++s) {
    if (size[s] == 0) continue;
    std::memcpy(h + map_at + 4 * static_cast<int64_t>(u.maps.offset[s]), t.maps[s].value,
                static_cast<size_t>(size[s] * 4));
  }
  u.device = host.to(*t.device, /*non_blocking=*/true);
  if (words > 0) {
    u.maps.words = reinterpret_cast<const uint32_t*>(static_cast<const uint8_t*>(u.device.data_ptr()) + map_at);
  }
  return u;
}

GradArgs grad_args(const char* op, const c10::optional<c10::Device>& device, bool maximize,
                   const OptTensor& grad_scale, const OptTensor& found_inf) {
  GradArgs ga;
  ga.grad_scale = optional_scalar(op, "grad_scale", grad_scale, device);
  ga.found_inf = optional_scalar(op, "found_inf", found_inf, device);
  ga.sign = maximize ? -1.0f : 1.0f;
  return ga;
}

// fn(launch, group, stream) for every launch group of table ``t`` whose rows and maps are on the
// device as ``u`` (upload).
template <class Fn>
void for_each_group(const char* op, const Table& t, const Upload& u, Fn&& fn) {
  if (t.groups.empty()) return;
  TORCH_CHECK(t.device->is_cuda(), op, ": CUDA kernel called with tensors on ", t.device->str());
  c10::cuda::CUDAGuard guard(*t.device);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto* base = reinterpret_cast<TensorRow*>(u.device.data_ptr());
  for (const Group& g : t.groups) {
    C10_CUDA_CHECK(fn(
        cuda::Launch{base + g.begin, g.n_rows, g.n_chunks, launch_param(t, g), g.grad, g.state, u.maps}, g, stream));
  }
}

// found_inf decides whether the host-side step counts move, so it is read here: one
// device-to-host copy, only when a found_inf tensor is passed.
bool found_inf_set(const OptTensor& found_inf) {
  return found_inf.has_value() && found_inf->defined() && found_inf->item<float>() != 0.0f;
}

// The CUDA side of the per-call optimizer ops (step.h): the table copied to the device after the
// step counts moved, one launch per group on the current stream; found_inf read once on the host
// where step counts depend on it.
struct CudaDevice {
  static constexpr int64_t kChunk = kCudaChunk;
  struct Ctx {
    GradArgs ga;
    bool skip;
    Upload upload;  // the device copy of the table's rows and maps, alive until the launches are queued
    cudaStream_t stream;
    c10::Device device;
  };
  static Ctx begin(const char* op, const Table& t, bool maximize, const OptTensor& grad_scale,
                   const OptTensor& found_inf, const OptTensors&, bool host_skip) {
    Ctx c{grad_args(op, t.device, maximize, grad_scale, found_inf), false, Upload{}, nullptr,
          t.device.value_or(c10::Device(c10::kCUDA))};
    c.skip = host_skip && found_inf_set(found_inf);
    return c;
  }
  template <class Fn>
  static void each(const char* op, Table& t, Ctx& c, Fn&& fn) {
    c.upload = upload(op, t);
    for_each_group(op, t, c.upload, [&](const cuda::Launch& l, const Group& g, cudaStream_t s) {
      c.stream = s;
      return fn(l, g);
    });
  }
  static cudaError_t adamw(const cuda::Launch& l, const Group&, const AdamWHyper& h, bool amsgrad, Ctx& c) {
    return cuda::adamw(l, h, amsgrad, c.ga, c.stream);
  }
  static cudaError_t adopt(const cuda::Launch& l, const Group&, const AdoptHyper& h, bool first_step, Ctx& c) {
    return cuda::adopt(l, h, first_step, c.ga, c.stream);
  }
  static Tensor partials(const Group& g, const Ctx& c) {
    return at::empty({g.n_chunks * kMaxReduce}, at::TensorOptions().dtype(at::kDouble).device(c.device));
  }
  static cudaError_t lamb(const cuda::Launch& l, const Group& g, const LambHyper& h, Ctx& c) {
    Tensor p = partials(g, c);
    return cuda::lamb(l, h, c.ga, p.data_ptr<double>(), c.stream);
  }
  static cudaError_t lamb_partials(const cuda::Launch& l, const Group& g, const LambHyper& h, Ctx& c,
                                   const Tensor& sums) {
    Tensor p = partials(g, c);
    return cuda::lamb_partials(l, h, c.ga, p.data_ptr<double>(), sums.data_ptr<double>(), c.stream);
  }
  static cudaError_t lamb_apply(const cuda::Launch& l, const Group&, const LambHyper& h, Ctx& c,
                                const Tensor& sums) {
    return cuda::lamb_apply(l, h, c.ga, sums.data_ptr<double>(), c.stream);
  }
  static cudaError_t sophia(const cuda::Launch& l, const Group&, const SophiaHyper& h, Ctx& c) {
    return cuda::sophia(l, h, c.ga, c.stream);
  }
  static cudaError_t sophia_hessian(const cuda::Launch& l, const Group&, const SophiaHyper& h, Ctx& c) {
    return cuda::sophia_hessian(l, h, c.ga, c.stream);
  }
};

}  // namespace
}  // namespace binding
}  // namespace mupopt

TORCH_LIBRARY_IMPL(mupopt, CUDA, m) {
  using namespace mupopt::binding;
  impl_step_ops<CudaDevice>(m);
}

// ---------------------------------------------------------------------------------------------
// Bound plans (csrc/bound.h, defined in bindings.cpp): the CUDA kernels of the step ops. Per
// step as the per-call ops: the plan's table (gradient addresses and scalars of this step)
// copied to the device once, one launch per group. Formats 32 and 16 only: a plan refuses uint8
// states (it keeps no block scales), and ops.py steps format 8 through the per-call ops.
// ---------------------------------------------------------------------------------------------
#include "bound.h"

namespace mupopt {
namespace binding {
namespace {

// Checks the gradients and found_inf (false: a bound tensor changed, nothing done) and reads
// the step counts; the caller then assembles and fills the table.
bool begin_bound(BoundPlan& p, const char* op, TensorList grads, bool maximize, const OptTensor& grad_scale,
                 const OptTensor& found_inf, GradArgs& ga, bool& skip) {
  if (!check_grads(p, op, grads)) return false;
  ga = grad_args(op, p.device, maximize, grad_scale, found_inf);
  skip = found_inf_set(found_inf);
  if (!skip) read_before(p);
  return true;
}

bool adamw_bound_cuda(Plan plan, TensorList grads, double lr, double beta1, double beta2, double weight_decay,
                      double eps, bool amsgrad, bool maximize, const OptTensor& grad_scale,
                      const OptTensor& found_inf) {
  const char* op = "adamw_bound_";
  BoundPlan& p = *plan;
  TORCH_CHECK(!amsgrad || p.has_max, op, ": amsgrad=True but the plan was bound without max_exp_avg_sqs");
  GradArgs ga;
  bool skip = false;
  if (!begin_bound(p, op, grads, maximize, grad_scale, found_inf, ga, skip)) return false;
  if (skip) return true;
  assemble(p, grads, kCudaChunk);
  adamw_scalars(p.table, p.before.data(), p.lr_mults.data(), p.wd_mults.data(), p.eps_mults.data(), lr, beta1,
                beta2, weight_decay, eps);
  set_rounding(p.table, p.sr_seeds, p.before.data());
  bump_bound_steps(p);
  const Upload rows = upload(op, p.table);
  const AdamWHyper h = make_adamw_hyper(beta1, beta2);
  for_each_group(op, p.table, rows, [&](const cuda::Launch& l, const Group&, cudaStream_t s) {
    return cuda::adamw(l, h, amsgrad, ga, s);
  });
  return true;
}

bool adopt_bound_cuda(Plan plan, TensorList grads, double lr, double beta1, double beta2, double weight_decay,
                      double eps, bool maximize, const OptTensor& grad_scale, const OptTensor& found_inf) {
  const char* op = "adopt_bound_";
  BoundPlan& p = *plan;
  GradArgs ga;
  bool skip = false;
  if (!begin_bound(p, op, grads, maximize, grad_scale, found_inf, ga, skip)) return false;
  if (skip) return true;
  assemble(p, grads, kCudaChunk, [&](int64_t i) { return adopt_variant(p.before[i]); });
  adopt_scalars(p.table, p.before.data(), p.lr_mults.data(), p.wd_mults.data(), p.eps_mults.data(), lr,
                weight_decay, eps);
  set_rounding(p.table, p.sr_seeds, p.before.data());
  bump_bound_steps(p);
  const Upload rows = upload(op, p.table);
  const AdoptHyper h = make_adopt_hyper(beta1, beta2);
  for_each_group(op, p.table, rows, [&](const cuda::Launch& l, const Group& g, cudaStream_t s) {
    return cuda::adopt(l, h, g.variant == 0, ga, s);
  });
  return true;
}

bool lamb_bound_cuda(Plan plan, TensorList grads, double lr, double beta1, double beta2, double weight_decay,
                     double eps, c10::optional<double> clamp_value, bool maximize, const OptTensor& grad_scale,
                     const OptTensor& found_inf) {
  const char* op = "lamb_bound_";
  BoundPlan& p = *plan;
  GradArgs ga;
  bool skip = false;
  if (!begin_bound(p, op, grads, maximize, grad_scale, found_inf, ga, skip)) return false;
  if (skip) return true;
  assemble(p, grads, kCudaChunk);
  lamb_scalars(p.table, p.before.data(), p.lr_mults.data(), p.eps_mults.data(), lr, beta1, beta2, eps);
  set_rounding(p.table, p.sr_seeds, p.before.data());
  bump_bound_steps(p);
  const Upload rows = upload(op, p.table);
  const LambHyper h =
      make_lamb_hyper(beta1, beta2, weight_decay, clamp_value.has_value(), clamp_value.value_or(0.0));
  for_each_group(op, p.table, rows, [&](const cuda::Launch& l, const Group& g, cudaStream_t s) {
    Tensor partials = at::empty({g.n_chunks * kMaxReduce}, at::TensorOptions().dtype(at::kDouble).device(p.device));
    return cuda::lamb(l, h, ga, partials.data_ptr<double>(), s);
  });
  return true;
}

bool sophia_bound_cuda(Plan plan, TensorList grads, double lr, double beta1, double rho, double bs,
                       double weight_decay, bool maximize, const OptTensor& grad_scale, const OptTensor& found_inf) {
  const char* op = "sophia_bound_";
  BoundPlan& p = *plan;
  GradArgs ga;
  bool skip = false;
  if (!begin_bound(p, op, grads, maximize, grad_scale, found_inf, ga, skip)) return false;
  if (skip) return true;
  assemble(p, grads, kCudaChunk);
  sophia_scalars(p.table, p.lr_mults.data(), p.wd_mults.data(), lr, weight_decay);
  set_rounding(p.table, p.sr_seeds, p.before.data());
  bump_bound_steps(p);
  const Upload rows = upload(op, p.table);
  const SophiaHyper h = make_sophia_hyper(beta1, 0.0, rho * bs);
  for_each_group(op, p.table, rows, [&](const cuda::Launch& l, const Group&, cudaStream_t s) {
    return cuda::sophia(l, h, ga, s);
  });
  return true;
}

// As sophia_hessian_: found_inf is read on the device only (no step counts to guard).
bool sophia_hessian_bound_cuda(Plan plan, TensorList grads, double beta2, const OptTensor& grad_scale,
                               const OptTensor& found_inf) {
  const char* op = "sophia_hessian_bound_";
  BoundPlan& p = *plan;
  if (!check_grads(p, op, grads)) return false;
  const GradArgs ga = grad_args(op, p.device, false, grad_scale, found_inf);
  assemble(p, grads, kCudaChunk);
  const Upload rows = upload(op, p.table);
  const SophiaHyper h = make_sophia_hyper(0.0, beta2, 0.0);
  for_each_group(op, p.table, rows, [&](const cuda::Launch& l, const Group&, cudaStream_t s) {
    return cuda::sophia_hessian(l, h, ga, s);
  });
  return true;
}

}  // namespace
}  // namespace binding
}  // namespace mupopt

TORCH_LIBRARY_IMPL(mupopt, CUDA, m) {
  using namespace mupopt::binding;
  m.impl("adamw_bound_", &adamw_bound_cuda);
  m.impl("adopt_bound_", &adopt_bound_cuda);
  m.impl("lamb_bound_", &lamb_bound_cuda);
  m.impl("sophia_bound_", &sophia_bound_cuda);
  m.impl("sophia_hessian_bound_", &sophia_hessian_bound_cuda);
}
