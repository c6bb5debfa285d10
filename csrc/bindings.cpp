// TORCH_LIBRARY(mupopt): the op schemas (with their mutation annotations) and the CPU kernels.
// bindings_cuda.cpp adds the CUDA kernels of the same ops when the CUDA library is built.
//
// Every op takes whole tensor lists (one call per param group). The optimizer ops take each
// tensor's step count and muP multipliers and form its scalars themselves (csrc/prepare.h: the
// reference's expressions in float64, rounded once); uniform hyperparameters are plain floats.
//
// state_bits (mupopt/optim/_lean_states.py): each tensor's states are in its param's dtype
// (format 32), bfloat16 (16) or uint8 codes (8, float32 / bfloat16 / float16 params). Format 8
// also takes ``absmax``, the float32 block scales of every uint8 state in list order (tensor by
// tensor, each tensor's states in the op's order), and ``maps``, one table per state list
// (csrc/include/mupopt/storage.h's QuantTable, built by mupopt/kernels/cpp/ops.py).
//
// kahan_summation (storage.h's compensated param format, mupopt/storage.py "Compensated
// stores"): ``compensations`` given (None: off) holds state["param_compensation"] of every
// bfloat16 / float16 param in list order (float32 / float64 params have none); the param is
// read as p + c and stored as the split. Not together with ``sr_seeds``.
//
// GradScaler: ``grad_scale`` (the loss scale; gradients are multiplied by 1/scale inside the
// kernel, as GradScaler.unscale_ does) and ``found_inf`` (nonzero: the call changes nothing, the
// step counts included) are optional float32 tensors with one element on the tensors' device.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "cpu/ops.h"
#include "prepare.h"
#include "step.h"
#include "table.h"

namespace mupopt {
namespace binding {
namespace {

using at::ArrayRef;
using at::Tensor;
using at::TensorList;

// The avx2+fma loops when this CPU has both and ATen also uses its AVX2/AVX512 kernels, whose
// lerp/add(alpha)/addcmul round once (see csrc/cpu/driver.h). ATen decides with the same cpuid
// bits and the same environment variable.
bool cpu_use_fma() {
#if MUPOPT_CPU_X86_DISPATCH
  static const bool use = [] {
    const char* env = std::getenv("ATEN_CPU_CAPABILITY");
    if (env != nullptr && (std::strcmp(env, "default") == 0 || std::strcmp(env, "DEFAULT") == 0)) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return use;
#else
  return true;
#endif
}

// The copy of the loops: plain without fma (above); 512-bit where the CPU has what ATen's AVX512
// kernels need (avx512 f, vl, bw, dq) and ATEN_CPU_CAPABILITY does not ask for avx2 (the two
// copies store the same bits: the same IEEE operations, fused alike), with format 8's VBMI codec
// where the CPU has avx512vbmi too (csrc/cpu/q8_vbmi.h; the same bits again).
cpu::Isa cpu_isa_choice() {
#if MUPOPT_CPU_X86_DISPATCH
  static const cpu::Isa isa = [] {
    if (!cpu_use_fma()) return cpu::Isa::kPlain;
    const char* env = std::getenv("ATEN_CPU_CAPABILITY");
    if (env != nullptr && (std::strcmp(env, "avx2") == 0 || std::strcmp(env, "AVX2") == 0)) return cpu::Isa::kAvx2Fma;
    __builtin_cpu_init();
    const bool wide = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
    if (!wide) return cpu::Isa::kAvx2Fma;
    return __builtin_cpu_supports("avx512vbmi") ? cpu::Isa::kAvx512Vbmi : cpu::Isa::kAvx512Fma;
  }();
  return isa;
#else
  return cpu_use_fma() ? cpu::Isa::kAvx2Fma : cpu::Isa::kPlain;
#endif
}

cpu::Args cpu_args(const char* op, const c10::optional<c10::Device>& device, bool maximize,
                   const OptTensor& grad_scale, const OptTensor& found_inf) {
  cpu::Args a;
  a.grad.grad_scale = optional_scalar(op, "grad_scale", grad_scale, device);
  a.grad.found_inf = optional_scalar(op, "found_inf", found_inf, device);
  a.grad.sign = maximize ? -1.0f : 1.0f;
  a.num_threads = at::get_num_threads();
  a.isa = cpu_isa_choice();
  return a;
}

cpu::Launch launch_of(Table& t, const Group& g) {
  return cpu::Launch{t.rows.data() + g.begin, g.n_rows, g.n_chunks, launch_param(t, g), g.grad, g.state,
                     t.maps.data()};
}

// The CPU side of the per-call optimizer ops (step.h): the loops of csrc/cpu on the table in
// place, found_inf read where it lies (a CPU tensor).
struct CpuDevice {
  static constexpr int64_t kChunk = kCpuChunk;
  struct Ctx {
    cpu::Args a;
    bool skip;
  };
  static Ctx begin(const char* op, const Table& t, bool maximize, const OptTensor& grad_scale,
                   const OptTensor& found_inf, const OptTensors&, bool) {
    Ctx c{cpu_args(op, t.device, maximize, grad_scale, found_inf), false};
    c.skip = cpu::skipped(c.a);
    return c;
  }
  template <class Fn>
  static void each(const char*, Table& t, Ctx&, Fn&& fn) {
    for (const Group& g : t.groups) fn(launch_of(t, g), g);
  }
  static void adamw(const cpu::Launch& l, const Group&, const AdamWHyper& h, bool amsgrad, Ctx& c) {
    cpu::adamw(l, h, amsgrad, c.a);
  }
  static void adopt(const cpu::Launch& l, const Group&, const AdoptHyper& h, bool first_step, Ctx& c) {
    cpu::adopt(l, h, first_step, c.a);
  }
  static void lamb(const cpu::Launch& l, const Group&, const LambHyper& h, Ctx& c) { cpu::lamb(l, h, c.a); }
  static void lamb_partials(const cpu::Launch& l, const Group&, const LambHyper& h, Ctx& c, const Tensor& sums) {
    cpu::lamb_partials(l, h, c.a, sums.data_ptr<double>());
  }
  static void lamb_apply(const cpu::Launch& l, const Group&, const LambHyper& h, Ctx& c, const Tensor& sums) {
    cpu::lamb_apply(l, h, c.a, sums.data_ptr<double>());
  }
  static void sophia(const cpu::Launch& l, const Group&, const SophiaHyper& h, Ctx& c) { cpu::sophia(l, h, c.a); }
  static void sophia_hessian(const cpu::Launch& l, const Group&, const SophiaHyper& h, Ctx& c) {
    cpu::sophia_hessian(l, h, c.a);
  }
};

// The memory bound of a step for the benchmarks (cpu/traffic.cpp): ``passes`` holds (load mask,
// store mask) pairs over the four lists, each pass one traversal of the lists with no math.
// The lists are checked as an optimizer's (list 0 param-like, 1 gradient-like and read only,
// 2-3 states); lists no pass uses may be empty.
void traffic_cpu(TensorList streams0, TensorList streams1, TensorList streams2, TensorList streams3,
                 at::IntArrayRef passes) {
  const char* op = "traffic_";
  TORCH_CHECK(!passes.empty() && passes.size() % 2 == 0, op,
              ": passes must hold (load mask, store mask) pairs, got ", passes.size(), " values");
  unsigned used = 0;
  for (size_t k = 0; k < passes.size(); k += 2) {
    const int64_t load = passes[k], store = passes[k + 1];
    TORCH_CHECK(load >= 0 && load < 16 && store >= 0 && store < 16 &&
                    cpu::traffic_supported(static_cast<unsigned>(load), static_cast<unsigned>(store)),
                op, ": no traffic pattern (load ", load, ", store ", store,
                "); supported: AdamW/ADOPT (15, 13), SophiaG (15, 5), Hessian EMA (6, 4), LAMB (15, 12) then (13, 1)");
    used |= static_cast<unsigned>(load | store);
  }
  const TensorList lists[4] = {streams0, streams1, streams2, streams3};
  const char* names[4] = {"streams0", "streams1", "streams2", "streams3"};
  std::array<Stream, kMaxStreams> streams{};
  for (int s = 0; s < 4; ++s) {
    if ((used >> s) & 1u) streams[s] = Stream{lists[s], names[s]};
  }
  // Lists 2 and 3 in list 0's dtype, bfloat16 or uint8 (the states of state_bits 32, 16, 8).
  Table t = make_table(op, streams, nullptr, 0, kCpuChunk, nullptr, LeanLists{{}, {}, /*raw_bytes=*/true});
  const cpu::Args a = cpu_args(op, t.device, false, c10::nullopt, c10::nullopt);
  for (size_t k = 0; k < passes.size(); k += 2) {
    for (const Group& g : t.groups) {
      cpu::traffic(launch_of(t, g), static_cast<unsigned>(passes[k]), static_cast<unsigned>(passes[k + 1]), a);
    }
  }
}

// Tests only: format 8's block codec alone (cpu/q8_codec.cpp) on the float32 values x with map
// table ``map``, codec "vbmi" (csrc/cpu/q8_vbmi.h) or "scalar": (codes, absmax, decoded values).
std::vector<Tensor> q8_codec_test(const Tensor& x, const Tensor& map, c10::string_view codec) {
  const char* op = "q8_codec_test";
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 1 && x.is_contiguous(), op,
              ": x must be a contiguous 1-D float32 CPU tensor, got ", describe(x));
  TORCH_CHECK(codec == "vbmi" || codec == "scalar", op, ": codec must be \"vbmi\" or \"scalar\", got \"",
              std::string(codec), "\"");
  const QuantTable t = check_map(op, 0, map);
  const int64_t n = x.numel();
  Tensor codes = at::empty({n}, x.options().dtype(at::kByte));
  Tensor absmax = at::empty({(n + kQuantBlock - 1) / kQuantBlock}, x.options());
  Tensor decoded = at::empty({n}, x.options());
  TORCH_CHECK(cpu::q8_codec(x.data_ptr<float>(), n, t, codec == "vbmi", codes.data_ptr<uint8_t>(),
                            absmax.data_ptr<float>(), decoded.data_ptr<float>()),
              op, ": this CPU has no AVX-512 VBMI");
  return {codes, absmax, decoded};
}

// Which loops this CPU build runs ("avx512+fma", "avx2+fma", "fma" or "plain"): for tests and
// benchmarks. The VBMI codec of format 8 is part of "avx512+fma" (it stores the same bits);
// q8_codec_test_ tells whether this CPU has it.
std::string cpu_isa() {
  switch (cpu_isa_choice()) {
    case cpu::Isa::kAvx512Fma:
    case cpu::Isa::kAvx512Vbmi:
      return "avx512+fma";
    case cpu::Isa::kAvx2Fma:
      return MUPOPT_CPU_X86_DISPATCH ? "avx2+fma" : "fma";
    default:
      return "plain";
  }
}

}  // namespace
}  // namespace binding
}  // namespace mupopt

TORCH_LIBRARY(mupopt, m) {
  // Optimizer steps, one call per param group. Per tensor: its state's "step" (a float32 CPU
  // scalar, incremented here) and its muP multipliers; the op forms each tensor's scalars
  // (csrc/prepare.h). Mutated: params, the states, the steps.
  m.def(
      "adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] state_steps, float[] lr_mults, float[] wd_mults, "
      "float[] eps_mults, *, float lr, float beta1, float beta2, float weight_decay, float eps, bool amsgrad, "
      "bool maximize, Tensor? grad_scale=None, Tensor? found_inf=None, int[] sr_seeds=[], Tensor(z!)[]? absmax=None, Tensor[]? maps=None, "
      "Tensor(y!)[]? compensations=None) -> ()");
  m.def(
      "adopt_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] state_steps, float[] lr_mults, float[] wd_mults, float[] eps_mults, *, float lr, "
      "float beta1, float beta2, float weight_decay, float eps, bool maximize, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, int[] sr_seeds=[], Tensor(z!)[]? absmax=None, Tensor[]? maps=None, "
      "Tensor(y!)[]? compensations=None) -> ()");
  m.def(
      "lamb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] state_steps, float[] lr_mults, float[] eps_mults, *, float lr, float beta1, float beta2, "
      "float weight_decay, float eps, float? clamp_value, bool maximize, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, int[] sr_seeds=[], Tensor(z!)[]? absmax=None, Tensor[]? maps=None, "
      "Tensor(y!)[]? compensations=None) -> ()");
  // lamb_ in two calls, for norms reduced by the caller in between (see lamb.h): lamb_partials_
  // updates the moments (float32 states) and the steps and returns float64 [N, 2], per tensor
  // (sum of p*p before the update, sum of u*u); lamb_apply_ takes those sums (reduced) and
  // finishes the step (bfloat16 states: their moments are stored here).
  m.def(
      "lamb_partials_(Tensor[] params, Tensor[] grads, Tensor(a!)[] exp_avgs, Tensor(b!)[] exp_avg_sqs, "
      "Tensor(c!)[] state_steps, float[] lr_mults, float[] eps_mults, *, float lr, float beta1, float beta2, "
      "float weight_decay, float eps, float? clamp_value, bool maximize, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, int[] sr_seeds=[], Tensor(z!)[]? absmax=None, Tensor[]? maps=None, "
      "Tensor[]? compensations=None) -> Tensor");
  m.def(
      "lamb_apply_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor[] state_steps, float[] lr_mults, float[] eps_mults, Tensor sums, *, float lr, float beta1, "
      "float beta2, float weight_decay, float eps, float? clamp_value, bool maximize, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, int[] sr_seeds=[], Tensor(z!)[]? absmax=None, Tensor[]? maps=None, "
      "Tensor(y!)[]? compensations=None) -> ()");
  m.def(
      "sophia_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor[] hessians, "
      "Tensor(c!)[] state_steps, float[] lr_mults, float[] wd_mults, *, float lr, float beta1, float rho, "
      "float bs, float weight_decay, bool maximize, Tensor? grad_scale=None, Tensor? found_inf=None, int[] sr_seeds=[], Tensor(z!)[]? absmax=None, Tensor[]? maps=None, "
      "Tensor(y!)[]? compensations=None) -> ()");
  m.def(
      "sophia_hessian_(Tensor[] grads, Tensor(a!)[] hessians, *, float beta2, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, Tensor(z!)[]? absmax=None, Tensor[]? maps=None) -> ()");
  // Which CPU loops run here: "avx2+fma", "fma" (non-x86) or "plain" (tests, benchmarks).
  m.def("cpu_isa() -> str", &mupopt::binding::cpu_isa);
  // Tests only: format 8's block codec alone, "vbmi" or "scalar" -> [codes, absmax, decoded].
  m.def("q8_codec_test(Tensor x, Tensor map, str codec) -> Tensor[]", &mupopt::binding::q8_codec_test);
  // Benchmarks: a step's traffic with no math, (load, store) mask pairs over the four lists.
  m.def(
      "traffic_(Tensor(a!)[] streams0, Tensor(b!)[] streams1, Tensor(c!)[] streams2, Tensor(d!)[] streams3, "
      "int[] passes) -> ()");
}

TORCH_LIBRARY_IMPL(mupopt, CPU, m) {
  using namespace mupopt::binding;
  impl_step_ops<CpuDevice>(m);
  m.impl("traffic_", &traffic_cpu);
}

// ---------------------------------------------------------------------------------------------
// Bound plans (csrc/bound.h): bind_<optimizer> checks and keeps a param group's params, states,
// step tensors and multipliers once; <optimizer>_bound_(plan, grads, hyperparameters) then does
// what <optimizer>_ does with them and this step's gradients, checking only the gradients (and
// that no bound tensor moved: it returns false and does nothing then, the caller binds again).
// The step ops write tensors the plan holds, which their schemas cannot say: eager use only
// (no fake kernels; torch.compile traces the per-call ops).
// ---------------------------------------------------------------------------------------------
#include "bound.h"

namespace mupopt {
namespace binding {
namespace {

bool adamw_bound_cpu(Plan plan, TensorList grads, double lr, double beta1, double beta2, double weight_decay,
                     double eps, bool amsgrad, bool maximize, const OptTensor& grad_scale,
                     const OptTensor& found_inf) {
  const char* op = "adamw_bound_";
  BoundPlan& p = *plan;
  TORCH_CHECK(!amsgrad || p.has_max, op, ": amsgrad=True but the plan was bound without max_exp_avg_sqs");
  if (!check_grads(p, op, grads)) return false;
  const cpu::Args a = cpu_args(op, p.device, maximize, grad_scale, found_inf);
  if (cpu::skipped(a)) return true;
  read_before(p);
  assemble(p, grads, kCpuChunk);
  adamw_scalars(p.table, p.before.data(), p.lr_mults.data(), p.wd_mults.data(), p.eps_mults.data(), lr, beta1,
                beta2, weight_decay, eps);
  set_rounding(p.table, p.sr_seeds, p.before.data());
  bump_bound_steps(p);
  const AdamWHyper h = make_adamw_hyper(beta1, beta2);
  for (const Group& g : p.table.groups) cpu::adamw(launch_of(p.table, g), h, amsgrad, a);
  return true;
}

bool adopt_bound_cpu(Plan plan, TensorList grads, double lr, double beta1, double beta2, double weight_decay,
                     double eps, bool maximize, const OptTensor& grad_scale, const OptTensor& found_inf) {
  const char* op = "adopt_bound_";
  BoundPlan& p = *plan;
  if (!check_grads(p, op, grads)) return false;
  const cpu::Args a = cpu_args(op, p.device, maximize, grad_scale, found_inf);
  if (cpu::skipped(a)) return true;
  read_before(p);
  assemble(p, grads, kCpuChunk, [&](int64_t i) { return adopt_variant(p.before[i]); });
  adopt_scalars(p.table, p.before.data(), p.lr_mults.data(), p.wd_mults.data(), p.eps_mults.data(), lr,
                weight_decay, eps);
  set_rounding(p.table, p.sr_seeds, p.before.data());
  bump_bound_steps(p);
  const AdoptHyper h = make_adopt_hyper(beta1, beta2);
  for (const Group& g : p.table.groups) cpu::adopt(launch_of(p.table, g), h, g.variant == 0, a);
  return true;
}

bool lamb_bound_cpu(Plan plan, TensorList grads, double lr, double beta1, double beta2, double weight_decay,
                    double eps, c10::optional<double> clamp_value, bool maximize, const OptTensor& grad_scale,
                    const OptTensor& found_inf) {
  const char* op = "lamb_bound_";
  BoundPlan& p = *plan;
  if (!check_grads(p, op, grads)) return false;
  const cpu::Args a = cpu_args(op, p.device, maximize, grad_scale, found_inf);
  if (cpu::skipped(a)) return true;
  read_before(p);
  assemble(p, grads, kCpuChunk);
  lamb_scalars(p.table, p.before.data(), p.lr_mults.data(), p.eps_mults.data(), lr, beta1, beta2, eps);
  set_rounding(p.table, p.sr_seeds, p.before.data());
  bump_bound_steps(p);
  const LambHyper h =
      make_lamb_hyper(beta1, beta2, weight_decay, clamp_value.has_value(), clamp_value.value_or(0.0));
  for (const Group& g : p.table.groups) cpu::lamb(launch_of(p.table, g), h, a);
  return true;
}

bool sophia_bound_cpu(Plan plan, TensorList grads, double lr, double beta1, double rho, double bs,
                      double weight_decay, bool maximize, const OptTensor& grad_scale, const OptTensor& found_inf) {
  const char* op = "sophia_bound_";
  BoundPlan& p = *plan;
  if (!check_grads(p, op, grads)) return false;
  const cpu::Args a = cpu_args(op, p.device, maximize, grad_scale, found_inf);
  if (cpu::skipped(a)) return true;
  read_before(p);
  assemble(p, grads, kCpuChunk);
  sophia_scalars(p.table, p.lr_mults.data(), p.wd_mults.data(), lr, weight_decay);
  set_rounding(p.table, p.sr_seeds, p.before.data());
  bump_bound_steps(p);
  const SophiaHyper h = make_sophia_hyper(beta1, 0.0, rho * bs);  // rho*bs: the reference's float64 product
  for (const Group& g : p.table.groups) cpu::sophia(launch_of(p.table, g), h, a);
  return true;
}

bool sophia_hessian_bound_cpu(Plan plan, TensorList grads, double beta2, const OptTensor& grad_scale,
                              const OptTensor& found_inf) {
  const char* op = "sophia_hessian_bound_";
  BoundPlan& p = *plan;
  if (!check_grads(p, op, grads)) return false;
  const cpu::Args a = cpu_args(op, p.device, false, grad_scale, found_inf);
  if (cpu::skipped(a)) return true;
  assemble(p, grads, kCpuChunk);
  const SophiaHyper h = make_sophia_hyper(0.0, beta2, 0.0);
  for (const Group& g : p.table.groups) cpu::sophia_hessian(launch_of(p.table, g), h, a);
  return true;
}

// <optimizer>_bound_grads_(plan, hyperparameters): <optimizer>_bound_ with each bound param's
// own .grad as the gradients, read here. No tensor argument, so one catch-all kernel that calls
// the step op through the dispatcher, which picks its CPU or CUDA kernel by the gradients.
template <class Sig>
c10::TypedOperatorHandle<Sig> step_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

bool adamw_bound_grads(Plan plan, double lr, double beta1, double beta2, double weight_decay, double eps,
                       bool amsgrad, bool maximize) {
  static const auto op = step_op<bool(Plan, TensorList, double, double, double, double, double, bool, bool,
                                      const OptTensor&, const OptTensor&)>("mupopt::adamw_bound_");
  const std::vector<Tensor> grads = param_grads(*plan, "adamw_bound_grads_");
  return op.call(plan, grads, lr, beta1, beta2, weight_decay, eps, amsgrad, maximize, c10::nullopt, c10::nullopt);
}

bool adopt_bound_grads(Plan plan, double lr, double beta1, double beta2, double weight_decay, double eps,
                       bool maximize) {
  static const auto op = step_op<bool(Plan, TensorList, double, double, double, double, double, bool,
                                      const OptTensor&, const OptTensor&)>("mupopt::adopt_bound_");
  const std::vector<Tensor> grads = param_grads(*plan, "adopt_bound_grads_");
  return op.call(plan, grads, lr, beta1, beta2, weight_decay, eps, maximize, c10::nullopt, c10::nullopt);
}

bool lamb_bound_grads(Plan plan, double lr, double beta1, double beta2, double weight_decay, double eps,
                      c10::optional<double> clamp_value, bool maximize) {
  static const auto op = step_op<bool(Plan, TensorList, double, double, double, double, double, c10::optional<double>,
                                      bool, const OptTensor&, const OptTensor&)>("mupopt::lamb_bound_");
  const std::vector<Tensor> grads = param_grads(*plan, "lamb_bound_grads_");
  return op.call(plan, grads, lr, beta1, beta2, weight_decay, eps, clamp_value, maximize, c10::nullopt,
                 c10::nullopt);
}

bool sophia_bound_grads(Plan plan, double lr, double beta1, double rho, double bs, double weight_decay,
                        bool maximize) {
  static const auto op = step_op<bool(Plan, TensorList, double, double, double, double, double, bool,
                                      const OptTensor&, const OptTensor&)>("mupopt::sophia_bound_");
  const std::vector<Tensor> grads = param_grads(*plan, "sophia_bound_grads_");
  return op.call(plan, grads, lr, beta1, rho, bs, weight_decay, maximize, c10::nullopt, c10::nullopt);
}

bool sophia_hessian_bound_grads(Plan plan, double beta2) {
  static const auto op =
      step_op<bool(Plan, TensorList, double, const OptTensor&, const OptTensor&)>("mupopt::sophia_hessian_bound_");
  const std::vector<Tensor> grads = param_grads(*plan, "sophia_hessian_bound_grads_");
  return op.call(plan, grads, beta2, c10::nullopt, c10::nullopt);
}

}  // namespace
}  // namespace binding
}  // namespace mupopt

TORCH_LIBRARY_FRAGMENT(mupopt, m) {
  using mupopt::binding::BoundPlan;
  m.class_<BoundPlan>("BoundPlan")
      .def("size", &BoundPlan::size)  // tensors bound
      .def("op", &BoundPlan::op);     // the per-call op it stands for ("adamw_", ...)
#define MUPOPT_PLAN "__torch__.torch.classes.mupopt.BoundPlan"
  m.def("bind_adamw(Tensor[] params, Tensor[] exp_avgs, Tensor[] exp_avg_sqs, Tensor[] max_exp_avg_sqs, "
        "Tensor[] state_steps, float[] lr_mults, float[] wd_mults, float[] eps_mults, int[] sr_seeds=[], "
        "Tensor[]? absmax=None, Tensor[]? maps=None, Tensor[]? compensations=None) -> " MUPOPT_PLAN,
        &mupopt::binding::bind_adamw);
  m.def("bind_adopt(Tensor[] params, Tensor[] exp_avgs, Tensor[] exp_avg_sqs, Tensor[] state_steps, "
        "float[] lr_mults, float[] wd_mults, float[] eps_mults, int[] sr_seeds=[], Tensor[]? absmax=None, "
        "Tensor[]? maps=None, Tensor[]? compensations=None) -> " MUPOPT_PLAN,
        &mupopt::binding::bind_adopt);
  m.def("bind_lamb(Tensor[] params, Tensor[] exp_avgs, Tensor[] exp_avg_sqs, Tensor[] state_steps, "
        "float[] lr_mults, float[] eps_mults, int[] sr_seeds=[], Tensor[]? absmax=None, Tensor[]? maps=None, "
        "Tensor[]? compensations=None) -> " MUPOPT_PLAN,
        &mupopt::binding::bind_lamb);
  m.def("bind_sophia(Tensor[] params, Tensor[] exp_avgs, Tensor[] hessians, Tensor[] state_steps, "
        "float[] lr_mults, float[] wd_mults, int[] sr_seeds=[], Tensor[]? absmax=None, Tensor[]? maps=None, "
        "Tensor[]? compensations=None) -> " MUPOPT_PLAN,
        &mupopt::binding::bind_sophia);
  m.def("bind_sophia_hessian(Tensor[] params, Tensor[] hessians, Tensor[]? absmax=None, Tensor[]? maps=None) -> "
        MUPOPT_PLAN,
        &mupopt::binding::bind_sophia_hessian);
  // true: stepped (or skipped for found_inf); false: a bound tensor changed, nothing done.
  m.def("adamw_bound_(" MUPOPT_PLAN " plan, Tensor[] grads, *, float lr, float beta1, float beta2, "
        "float weight_decay, float eps, bool amsgrad, bool maximize, Tensor? grad_scale=None, "
        "Tensor? found_inf=None) -> bool");
  m.def("adopt_bound_(" MUPOPT_PLAN " plan, Tensor[] grads, *, float lr, float beta1, float beta2, "
        "float weight_decay, float eps, bool maximize, Tensor? grad_scale=None, Tensor? found_inf=None) -> bool");
  m.def("lamb_bound_(" MUPOPT_PLAN " plan, Tensor[] grads, *, float lr, float beta1, float beta2, "
        "float weight_decay, float eps, float? clamp_value, bool maximize, Tensor? grad_scale=None, "
        "Tensor? found_inf=None) -> bool");
  m.def("sophia_bound_(" MUPOPT_PLAN " plan, Tensor[] grads, *, float lr, float beta1, float rho, float bs, "
        "float weight_decay, bool maximize, Tensor? grad_scale=None, Tensor? found_inf=None) -> bool");
  m.def("sophia_hessian_bound_(" MUPOPT_PLAN " plan, Tensor[] grads, *, float beta2, Tensor? grad_scale=None, "
        "Tensor? found_inf=None) -> bool");
  // The same with each bound param's own .grad as the gradients (no list from Python).
  m.def("adamw_bound_grads_(" MUPOPT_PLAN " plan, *, float lr, float beta1, float beta2, float weight_decay, "
        "float eps, bool amsgrad, bool maximize) -> bool",
        &mupopt::binding::adamw_bound_grads);
  m.def("adopt_bound_grads_(" MUPOPT_PLAN " plan, *, float lr, float beta1, float beta2, float weight_decay, "
        "float eps, bool maximize) -> bool",
        &mupopt::binding::adopt_bound_grads);
  m.def("lamb_bound_grads_(" MUPOPT_PLAN " plan, *, float lr, float beta1, float beta2, float weight_decay, "
        "float eps, float? clamp_value, bool maximize) -> bool",
        &mupopt::binding::lamb_bound_grads);
  m.def("sophia_bound_grads_(" MUPOPT_PLAN " plan, *, float lr, float beta1, float rho, float bs, "
        "float weight_decay, bool maximize) -> bool",
        &mupopt::binding::sophia_bound_grads);
  m.def("sophia_hessian_bound_grads_(" MUPOPT_PLAN " plan, *, float beta2) -> bool",
        &mupopt::binding::sophia_hessian_bound_grads);
#undef MUPOPT_PLAN
}

TORCH_LIBRARY_IMPL(mupopt, CPU, m) {
  using namespace mupopt::binding;
  m.impl("adamw_bound_", &adamw_bound_cpu);
  m.impl("adopt_bound_", &adopt_bound_cpu);
  m.impl("lamb_bound_", &lamb_bound_cpu);
  m.impl("sophia_bound_", &sophia_bound_cpu);
  m.impl("sophia_hessian_bound_", &sophia_hessian_bound_cpu);
}
