"""torch's own optimizer test database, applied to mupopt.AdamW and mupopt.Muon.

PyTorch ships its optimizer test inputs in the wheel (torch/testing/_internal/common_optimizers.py):
``optim_db`` holds one ``OptimizerInfo`` per optimizer with ``optim_inputs_func`` (the kwargs
variants torch tests every behaviour with) and ``optim_error_inputs_func`` (bad inputs with the
error type and message torch raises). torch's behaviour tests themselves (test/test_optim.py) are
not in the wheel; the ones that apply are restated here, named after torch's, and run for every
backend of the optimizer that works on CPU tensors here: "reference" and "cpu" everywhere, and
"triton" in its interpreter for the comparisons with torch (tiny tensors: about 1.4 s per Muon
variant, 0.2 s per AdamW one); the other behaviour tests use the default backend.

What applies, per optimizer (counterpart: torch.optim.AdamW / torch.optim.Muon):

- matches the counterpart (torch's test_foreach_matches_forloop / test_fused_matches_forloop
  compare implementations of one optimizer; here mupopt's backends are compared with torch's
  single-tensor implementation) for every kwargs variant of ``optim_inputs_func``, on one param
  group and on two groups with their own lr and weight_decay (test_param_groups_*);
- test_errors: every error input of ``optim_error_inputs_func`` for the CPU raises the same
  exception type (or warning) with a message matching torch's regex, except those listed in
  NOT_APPLICABLE_ERRORS;
- test_step_is_noop_when_params_have_no_grad, test_optimizer_can_be_printed,
  test_state_dict_deterministic, test_can_load_older_state_dict (the flags added after the
  optimizer first shipped removed from a state_dict, step counts as Python numbers),
  test_load_nontensor_step, test_deepcopy_copies_all_public_attrs,
  test_save_load_equality_with_weights_only.

What does not apply, and why (whole parts of optim_db):

- Every OptimizerInfo other than AdamW and Muon (Adadelta, Adafactor, Adagrad, Adam, Adamax,
  ASGD, LBFGS, NAdam, RAdam, RMSprop, Rprop, SGD, SparseAdam): mupopt has no such optimizer.
  ADOPT, LAMB, SophiaG and Shampoo have no entry in optim_db (their references are other
  packages or none); tests/test_state_dict.py and tests/test_contract.py hold them to those.
- kwargs variants with ``capturable=True`` (CUDA configs of optim_inputs_func): capturable
  selects torch's CUDA-graph-safe implementation, which mupopt does not provide (construction
  refuses capturable=True). The same variants are run with capturable removed: their tensor
  lr and tensor betas (1-element, any shape) apply.
- ``differentiable``, ``foreach``, ``fused`` (supported_impls): implementation switches of torch;
  mupopt accepts foreach/fused and records them in the groups, and ``backend=`` chooses the
  implementation. torch's two parity tests of a derived implementation against the for-loop one
  are restated with mupopt's backends as the derived implementation: test_foreach_matches_forloop
  (float64, every CPU backend) and test_fused_matches_forloop (float64, float32, bfloat16,
  float16, the fused "cpu" backend), on torch's own model, schedule of frozen layers and
  gradient-free steps, and tolerances. The others (test_fused_large_tensor,
  test_fused_cpu_matches_cuda, test_peak_memory_foreach, test_set_default_dtype_works_with_foreach,
  test_defaults_changed_to_foreach, test_differentiable_*) test torch's implementations
  themselves (memory of its foreach kernels, its CUDA kernels, autograd through the step) and are
  replaced by the comparison of every mupopt backend with torch.
- test_complex / test_complex_2d (AdamW's supports_complex=True): mupopt refuses complex
  parameters today (issue 13 item 9, owned elsewhere); test_complex_parameter_refused in
  tests/test_errors.py holds the current behaviour.
- CUDA-only tests (test_state_dict_with_cuda_params, test_mixed_device_dtype, multi-GPU, graph
  capture, test_cpu_load_state_dict, fused found_inf tests): no CUDA here; GradScaler with
  mupopt is tested in tests/test_amp.py.
- Sparse tests (supports_sparse=False for both).
- Scheduler and hook tests (test_param_group_with_lrscheduler_goes_right_direction, step and
  state_dict hooks): these exercise torch.optim.Optimizer's own machinery, which mupopt
  inherits unchanged; tests/test_state_dict.py checks hooks, closures and zero_grad.
- Compiled-optimizer parity (test/inductor): tests/test_compile.py.
"""
from __future__ import annotations

import copy
import importlib.util
import io

import pytest
import torch
from torch.nn import Parameter

import mupopt
from mupopt import backends

import triton_mode  # noqa: E402

# common_optimizers imports torch's test utilities, which need expecttest (a test extra).
pytest.importorskip("expecttest", reason="torch's test database needs expecttest: pip install -e .[test]")
_flags_were_frozen = torch.backends.flags_frozen()
try:
    # torch's test utilities import triton. The first import of triton fixes its mode for the
    # process: imported here outside defining_kernels(), triton's library functions would be
    # compiled-mode and every interpreted Triton test collected after this module would fail
    # ("Cannot call @triton.jit'd outside of the scope of a kernel").
    with triton_mode.defining_kernels():
        from torch.testing._internal import common_optimizers as co

        # The Triton kernels' mode is fixed here too: interpreted (CPU tensors) without CUDA.
        TRITON_ON_CPU = False
        if importlib.util.find_spec("triton") is not None:
            from mupopt.kernels.triton import _common

            TRITON_ON_CPU = bool(_common.INTERPRET)
except ImportError as exc:  # an older or trimmed torch without the database
    pytest.skip(f"torch.testing._internal.common_optimizers unavailable: {exc}", allow_module_level=True)
finally:
    # Importing torch's common_utils freezes torch.backends flags for the whole process
    # (torch.backends.disable_global_flags()); other test modules must not inherit that.
    if not _flags_were_frozen and torch.backends.flags_frozen():
        setattr(torch.backends, "__allow_nonbracketed_mutation_flag", True)

INFOS = {info.optim_cls: info for info in co.optim_db}
ADAMW = INFOS.get(torch.optim.AdamW)
MUON = INFOS.get(getattr(torch.optim, "Muon", None))
STEPS = 4

# Error inputs of torch that concern torch's implementations, not the optimizer's contract:
# desc -> why mupopt behaves otherwise (and what it does instead, tested below).
NOT_APPLICABLE_ERRORS = {
    "lr as Tensor doesn't work with foreach & not capturable":
        "torch's foreach kernels cannot take a tensor lr; mupopt ignores foreach and every backend "
        "takes a tensor lr (test_tensor_hyperparameters_with_foreach_step)",
    r"betas\[0\] as a Tensor is not supported for capturable=False and foreach=True":
        "as above, for tensor betas",
    "only support 2D parameters":
        "mupopt.Muon orthogonalises conv kernels as (shape[0], -1) (README, tests/test_muon.py)",
    "does not support complex parameters":
        "mupopt refuses complex params at construction with ValueError, not at step() with "
        "RuntimeError (issue 13 item 9 decides complex support; test_complex_refused_earlier)",
}


def cpu_backends(rule: str, triton: bool = False) -> list[str]:
    """The backends of ``rule`` that run on CPU tensors here; "triton" (its interpreter) only
    where asked for: the comparisons with torch, whose tensors are tiny."""
    names = ["reference", "cpu"] + (["triton"] if triton and TRITON_ON_CPU else [])
    return [b for b in names if b in backends.names(rule)]


def _backend_env(backend: str, monkeypatch) -> None:
    """The interpreted Triton kernels run while TRITON_INTERPRET=1 (tests/triton_mode.py); the
    other tests leave the environment alone, so that "auto" never picks the interpreter."""
    if backend == "triton":
        triton_mode.match_environment(monkeypatch, True)


def _named_inputs(info, device):
    """(desc, kwargs) of the info's optim_inputs_func, capturable stripped (module docstring)."""
    out = []
    for oi in info.optim_inputs_func(device=device, dtype=torch.float32):
        kwargs = dict(oi.kwargs)
        stripped = kwargs.pop("capturable", False)
        out.append((oi.desc + (" (capturable removed)" if stripped else ""), kwargs))
    return out


def _inputs(info):
    """The CPU variants plus the CUDA-only ones with capturable removed, without duplicates."""
    if info is None:
        return []
    seen, out = set(), []
    for device in ("cpu", "cuda"):
        for desc, kwargs in _named_inputs(info, device):
            key = repr(sorted((k, repr(v)) for k, v in kwargs.items()))
            if key not in seen:
                seen.add(key)
                out.append(pytest.param(kwargs, id=desc.replace(" ", "_")))
    return out


def _weight_bias(seed=0, muon=False):
    """torch's test model: weight (10, 5) and bias (10); for Muon two matrices (it takes 2-D
    params only)."""
    gen = torch.Generator().manual_seed(seed)
    second = (6, 10) if muon else (10,)
    return [Parameter(torch.randn(10, 5, generator=gen)), Parameter(torch.randn(second, generator=gen))]


def _clone(params):
    return [Parameter(p.detach().clone()) for p in params]


def _closure(params, opt, t):
    """A deterministic loss of both params, recomputed by step() (as torch's tests do)."""
    gen = torch.Generator().manual_seed(100 + t)
    x = torch.randn(5, generator=gen)

    def closure():
        opt.zero_grad()
        w, b = params
        y = w.mv(x)
        loss = (y + b).pow(2).sum() if b.ndim == 1 else (b @ y.tanh()).pow(2).sum()
        loss.backward()
        return loss

    return closure


def _run(opt, params, steps=STEPS, start=0):
    for t in range(start, start + steps):
        opt.step(_closure(params, opt, t))


def _assert_matches(ours, theirs, exact):
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if exact:
            assert torch.equal(a.detach(), b.detach()), f"param {i}: max diff {(a - b).abs().max().item():.3g}"
        else:
            torch.testing.assert_close(a.detach(), b.detach(), msg=f"param {i}")


# ---------------------------------------------------------------------------------------------
# AdamW
# ---------------------------------------------------------------------------------------------
needs_adamw = pytest.mark.skipif(ADAMW is None, reason="this torch's optim_db has no AdamW entry")


@needs_adamw
@pytest.mark.parametrize("backend", cpu_backends("adamw", triton=True))
@pytest.mark.parametrize("kwargs", _inputs(ADAMW))
@pytest.mark.parametrize("layout", ["one group", "two groups"])
def test_adamw_matches_torch(kwargs, backend, layout, monkeypatch):
    """Every kwargs variant of torch's database: mupopt.AdamW over STEPS closure steps equals
    torch.optim.AdamW (foreach=False: the single-tensor path). Bit for bit on the reference
    backend (README) for float hyperparameters; to float32 round-off on "cpu" (issue 13 item
    10 owns its last bits) and wherever lr or betas are tensors (_exact)."""
    _backend_env(backend, monkeypatch)
    ours = _weight_bias()
    theirs = _clone(ours)

    def groups(ps):
        if layout == "one group":
            return ps
        return [{"params": ps[:1]}, {"params": ps[1:], "lr": 0.5 * float(kwargs.get("lr", 1e-3)), "weight_decay": 0.3}]

    o = mupopt.AdamW(groups(ours), **kwargs, backend=backend)
    r = torch.optim.AdamW(groups(theirs), **{**kwargs, "foreach": False})
    _run(o, ours)
    _run(r, theirs)
    moved = max((a.detach() - b).abs().max().item() for a, b in zip(ours, _weight_bias()))
    assert moved > 1e-4  # the comparison can fail: the params moved
    _assert_matches(ours, theirs, exact=_exact(backend, kwargs))


def _exact(backend: str, kwargs: dict) -> bool:
    """Whether mupopt's result must equal torch's bit for bit: on the reference backend with
    float hyperparameters. With a tensor lr or tensor betas torch's single-tensor AdamW forms
    the bias corrections and the step size in float32 tensor arithmetic (``1 - beta1**step``
    on a float32 tensor); every mupopt backend forms them in float64 from the values (as for
    float hyperparameters), so some elements differ in the last bit (measured: 2.4e-7 after 4
    steps)."""
    tensors = isinstance(kwargs.get("lr"), torch.Tensor) or any(isinstance(b, torch.Tensor) for b in kwargs.get("betas", ()))
    return backend == "reference" and not tensors


def _cpu_inputs(info, dtype):
    """The kwargs variants torch's derived-implementation tests use on the CPU (none is
    capturable there)."""
    if info is None:
        return []
    return [(oi.desc, dict(oi.kwargs)) for oi in info.optim_inputs_func(device="cpu", dtype=dtype)]


def _derived_model(dtype):
    """torch's _test_derived_optimizers model: Linear(2, 3), Sigmoid, Linear(3, 1), Sigmoid in
    ``dtype`` (seed 1), plus a 0-dim parameter as the list's last (pytorch issue 100701)."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1), torch.nn.Sigmoid())
    model.to(dtype=dtype)
    extra = torch.zeros((), dtype=dtype, requires_grad=True)  # torch: empty (uninitialised memory)
    extra.grad = torch.rand_like(extra)
    return model, list(model.parameters()) + [extra]


def _derived_matches_forloop(kwargs, dtype, make_ours, desc):
    """torch's _compare_between: 7 steps of the for-loop AdamW (foreach=False) and of ours from
    identical models; step 2 without gradients (a no-op), model[2] frozen at steps 3 and 4; after
    every step each param and each state entry of ours equal to torch's with assertEqual's
    default tolerances for ``dtype`` (float64: 1e-7), dtypes included, and then set to torch's
    (its TensorTracker.pop_check_set: each step is compared from the same start)."""
    x = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=dtype).reshape(3, 2)
    m_ref, p_ref = _derived_model(dtype)
    m_our, p_our = _derived_model(dtype)
    ref = torch.optim.AdamW(p_ref, **kwargs, foreach=False)
    ours = make_ours(p_our)
    for i in range(7):
        for model, opt in ((m_ref, ref), (m_our, ours)):
            opt.zero_grad()
            if i == 3:
                model[2].requires_grad_(False)
            if i == 5:
                model[2].requires_grad_(True)
            if i != 2:
                model(x).sum().backward()
            opt.step()
        for k, (a, b) in enumerate(zip(p_ref, p_our)):
            pairs = [(b, a, f"param {k}")] + [(ours.state[b][key], v, f"{key} of param {k}") for key, v in ref.state[a].items()]
            for mine, theirs, what in pairs:
                torch.testing.assert_close(mine, theirs, msg=lambda m: f"{desc}: step {i}, {what}: {m}")
                with torch.no_grad():
                    mine.copy_(theirs)
    # Every model param was stepped (the 0-dim one loses its gradient to the first zero_grad, as
    # in torch's test) and the params moved.
    assert all(ours.state[b] for b in p_our[:-1]) and not ours.state[p_our[-1]]
    assert any(not torch.equal(a, b) for a, b in zip(p_our, _derived_model(dtype)[1]))
    return ours


@needs_adamw
@pytest.mark.parametrize("backend", cpu_backends("adamw"))
def test_foreach_matches_forloop(backend):
    """torch's test_foreach_matches_forloop (float64) with a mupopt backend as the derived
    implementation: float64 params are stepped in float64 by every CPU backend."""
    for desc, kwargs in _cpu_inputs(ADAMW, torch.float64):
        def make(params):
            return mupopt.AdamW(params, **kwargs, foreach=True, backend=backend)

        opt = _derived_matches_forloop(kwargs, torch.float64, make, desc)
        assert opt.selected_backends == [{"adamw": backend}], opt.selected_backends


@needs_adamw
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["float64", "float32", "bfloat16", "float16"])
def test_fused_matches_forloop(dtype):
    """torch's test_fused_matches_forloop (every floating dtype) with the fused "cpu" backend as
    the fused implementation. bfloat16 and float16 are computed in float32 there (as torch's
    fused kernels do) and in the storage dtype by the for-loop; torch's default tolerances for
    those dtypes cover the difference, as they do for torch's own fused AdamW."""
    if "cpu" not in backends.names("adamw"):
        pytest.skip("backend 'cpu' is not registered")

    for desc, kwargs in _cpu_inputs(ADAMW, dtype):
        def make(params):
            return mupopt.AdamW(params, **kwargs, fused=True, backend="cpu")

        opt = _derived_matches_forloop(kwargs, dtype, make, desc)
        assert opt.selected_backends == [{"adamw": "cpu"}], opt.selected_backends


def _error_inputs(info):
    if info is None:
        return []
    return [pytest.param(e, id=e.optimizer_error_input.desc.replace(" ", "_"))
            for e in info.optim_error_inputs_func(device="cpu", dtype=torch.float32)]


def _check_error_input(cls, error_input, default_params, **extra):
    oi = error_input.optimizer_error_input
    if oi.desc in NOT_APPLICABLE_ERRORS:
        pytest.skip(NOT_APPLICABLE_ERRORS[oi.desc])
    params = default_params if oi.params is None else oi.params

    def act():
        opt = cls(params, **oi.kwargs, **extra)
        if error_input.error_on == co.OptimizerErrorEnum.STEP_ERROR:
            opt.step()

    if issubclass(error_input.error_type, Warning):
        with pytest.warns(error_input.error_type, match=error_input.error_regex):
            act()
    else:
        with pytest.raises(error_input.error_type, match=error_input.error_regex):
            act()


@needs_adamw
@pytest.mark.parametrize("error_input", _error_inputs(ADAMW))
def test_adamw_errors(error_input):
    """torch's test_errors: the same exception type and message as torch.optim.AdamW."""
    _check_error_input(mupopt.AdamW, error_input, _weight_bias())


@needs_adamw
@pytest.mark.parametrize("backend", cpu_backends("adamw", triton=True))
def test_tensor_hyperparameters_with_foreach_step(backend, monkeypatch):
    """What mupopt does instead of torch's foreach errors (NOT_APPLICABLE_ERRORS): a tensor lr
    and tensor betas with foreach=True construct and step like torch's single-tensor path."""
    _backend_env(backend, monkeypatch)
    kwargs = dict(lr=torch.tensor(0.01), betas=(torch.tensor(0.9), torch.tensor(0.99)))
    ours = _weight_bias()
    theirs = _clone(ours)
    o = mupopt.AdamW(ours, **kwargs, foreach=True, backend=backend)
    r = torch.optim.AdamW(theirs, **kwargs, foreach=False)
    _run(o, ours)
    _run(r, theirs)
    _assert_matches(ours, theirs, exact=_exact(backend, kwargs))


def _all_cases():
    cases = []
    if ADAMW is not None:
        cases.append(pytest.param(mupopt.AdamW, torch.optim.AdamW, ADAMW, False, id="AdamW"))
    if MUON is not None:
        cases.append(pytest.param(mupopt.Muon, torch.optim.Muon, MUON, True, id="Muon"))
    return cases


@pytest.mark.parametrize("cls,torch_cls,info,muon", _all_cases())
def test_step_is_noop_when_params_have_no_grad(cls, torch_cls, info, muon):
    params = _weight_bias(muon=muon)
    before = [p.detach().clone() for p in params]
    for desc, kwargs in _named_inputs(info, "cpu"):
        opt = cls(params, **kwargs)
        opt.step()
        for p, q in zip(params, before):
            assert torch.equal(p.detach(), q), desc
        assert len(opt.state) == 0, desc


@pytest.mark.parametrize("cls,torch_cls,info,muon", _all_cases())
def test_optimizer_can_be_printed(cls, torch_cls, info, muon):
    opt = cls(_weight_bias(muon=muon))
    text = repr(opt)
    assert text.startswith(cls.__name__) and "Parameter Group 0" in text


@pytest.mark.parametrize("cls,torch_cls,info,muon", _all_cases())
def test_state_dict_deterministic(cls, torch_cls, info, muon):
    """Save mid-run, load into an optimizer over cloned params: both continue identically."""
    for desc, kwargs in _named_inputs(info, "cpu"):
        a_params = _weight_bias(muon=muon)
        a = cls(a_params, **kwargs)
        _run(a, a_params, 2)
        b_params = _clone(a_params)
        b = cls(b_params, **kwargs)
        buf = io.BytesIO()
        torch.save(a.state_dict(), buf)
        buf.seek(0)
        b.load_state_dict(torch.load(buf))
        _run(a, a_params, 2, start=2)
        _run(b, b_params, 2, start=2)
        _assert_matches(a_params, b_params, exact=True)


@pytest.mark.parametrize("cls,torch_cls,info,muon", _all_cases())
def test_can_load_older_state_dict(cls, torch_cls, info, muon):
    """A state_dict without the flags added after the optimizer first shipped
    (info.not_og_supported_flags) and with Python-number step counts (torch <= 1.11) loads, and
    the run continues exactly as before."""
    for desc, kwargs in _named_inputs(info, "cpu"):
        a_params = _weight_bias(muon=muon)
        a = cls(a_params, **kwargs)
        _run(a, a_params, 2)
        old = copy.deepcopy(a.state_dict())
        for group in old["param_groups"]:
            for flag in info.not_og_supported_flags:
                group.pop(flag, None)
        for st in old["state"].values():
            if "step" in st:
                st["step"] = st["step"].item()
        b_params = _clone(a_params)
        b = cls(b_params, **kwargs)
        b.load_state_dict(old)
        _run(a, a_params, 2, start=2)
        _run(b, b_params, 2, start=2)
        _assert_matches(a_params, b_params, exact=True)


@pytest.mark.parametrize("cls,torch_cls,info,muon", _all_cases())
def test_load_nontensor_step(cls, torch_cls, info, muon):
    """As torch's test: every step count set to a Python float, loaded, stepped."""
    params = _weight_bias(muon=muon)
    opt = cls(params)
    _run(opt, params, 1)
    sd = opt.state_dict()
    for st in sd["state"].values():
        if "step" in st:
            st["step"] = float(st["step"])
    opt.load_state_dict(sd)
    _run(opt, params, 1, start=1)
    for st in opt.state.values():
        if "step" in st:
            assert torch.is_tensor(st["step"]) and st["step"].dtype == torch.float32


@pytest.mark.parametrize("cls,torch_cls,info,muon", _all_cases())
def test_deepcopy_copies_all_public_attrs(cls, torch_cls, info, muon):
    """torch's test compares the public attributes of an optimizer and of its deepcopy; mupopt
    also needs its private ones but "_plan*" caches (tests/test_dropin.py), so a copy must step."""
    def public(obj):
        return {k for k in obj.__dict__ if not k.startswith("_")}

    for desc, kwargs in _named_inputs(info, "cpu"):
        params = _weight_bias(muon=muon)
        opt = cls(params, **kwargs)
        _run(opt, params, 2)
        twin = copy.deepcopy(opt)
        assert public(opt) == public(twin), desc
        _run(twin, [p for g in twin.param_groups for p in g["params"]], 1, start=2)


@pytest.mark.parametrize("cls,torch_cls,info,muon", _all_cases())
def test_save_load_equality_with_weights_only(cls, torch_cls, info, muon):
    """A state_dict round trip through torch.load(weights_only=True) gives an equal state_dict."""
    params = _weight_bias(muon=muon)
    opt = cls(params)
    _run(opt, params, 2)
    sd = opt.state_dict()
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert loaded["param_groups"] == sd["param_groups"]
    for k, st in sd["state"].items():
        for key, value in st.items():
            assert torch.equal(loaded["state"][k][key], value)


# ---------------------------------------------------------------------------------------------
# Muon
# ---------------------------------------------------------------------------------------------
needs_muon = pytest.mark.skipif(MUON is None, reason="this torch has no torch.optim.Muon entry in optim_db")
BF16_REL = 2.0**-7  # one bf16 rounding of the NS output, relative


@needs_muon
@pytest.mark.parametrize("backend", cpu_backends("muon", triton=True))
@pytest.mark.parametrize("kwargs", _inputs(MUON))
def test_muon_matches_torch(kwargs, backend, monkeypatch):
    """Every kwargs variant of torch's database on 2-D params: mupopt.Muon (no width info, so
    every matrix goes to Muon) equals torch.optim.Muon to the bf16 tolerance of Newton-Schulz
    (the same bf16 iteration; same-shape stacking may round differently)."""
    _backend_env(backend, monkeypatch)
    ours = _weight_bias(muon=True)
    theirs = _clone(ours)
    # ns_dtype: torch.optim.Muon's bf16 iteration (mupopt's default on the CPU is float32).
    o = mupopt.Muon(ours, **kwargs, ns_dtype=torch.bfloat16, backend=backend)
    r = torch.optim.Muon(theirs, **kwargs)
    _run(o, ours)
    _run(r, theirs)
    lr = float(kwargs.get("lr", 1e-3))
    factor = max(1.0, 10 / 5) ** 0.5  # torch's "original" shape factor of the (10, 5) matrix
    tol = STEPS * lr * factor * BF16_REL
    moved = min((a.detach() - b).abs().max().item() for a, b in zip(ours, _weight_bias(muon=True)))
    assert moved > 5 * tol  # the comparison can fail
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=tol)


@needs_muon
@pytest.mark.parametrize("error_input", _error_inputs(MUON))
def test_muon_errors(error_input):
    """torch's test_errors for Muon, params being (10, 5) and (6, 10) matrices by default."""
    _check_error_input(mupopt.Muon, error_input, _weight_bias(muon=True))


@needs_muon
def test_complex_refused_earlier():
    """What mupopt.Muon does with torch's complex error input (NOT_APPLICABLE_ERRORS): refused at
    construction, before anything exists to step."""
    p = torch.rand(2, 3, dtype=torch.complex64)
    p.grad = torch.rand_like(p)
    with pytest.raises(ValueError, match="does not support complex parameters"):
        mupopt.Muon([p])


def test_not_applicable_lists_name_real_inputs():
    """The lists above name inputs that exist in this torch's database (a renamed desc would
    silently stop skipping, and the test would then fail with the real reason)."""
    descs = {e.optimizer_error_input.desc for info in (ADAMW, MUON) if info is not None
             for e in info.optim_error_inputs_func(device="cpu", dtype=torch.float32)}
    for desc in NOT_APPLICABLE_ERRORS:
        assert desc in descs, desc
