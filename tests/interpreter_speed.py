"""Test-only: Triton's interpreter without its repeated patching of triton.language.

Under ``TRITON_INTERPRET=1`` a kernel launch patches ``triton.language`` (every builtin of
``tl``, ``tl.tensor``, ``tl.math``: ``inspect.getmembers`` over each) for the launch, and then
patches it again at every call of a nested ``@triton.jit`` function (``InterpretedFunction.
__call__``: triton 3.x), although the launch's patch is still in place. Our kernels call their
load/store/math helpers per program, so most of an interpreted step went there: AdamW on five
small tensors 0.08 s of CPU per step, 0.03-0.04 s without the repeats (Muon 1.0-1.4 -> 0.7;
same bits). :func:`install` skips a nested call's patch when the language modules it sees are
already patched by the enclosing launch; a nested function that sees another one (``tl.zeros``
lives in triton.language.standard, which sees ``tl.core``) is patched as before.

Speed only: it changes no result (a missed patch fails loudly: an unpatched builtin raises
"Did you forget to add @triton.jit?"). It installs only where triton's interpreter has the
shape it was written against, and is a no-op otherwise, or with ``MUPOPT_TEST_INTERPRETER_SPEED=0``
(to compare, or to rule it out).
"""
from __future__ import annotations

import inspect
import os

_installed = False


def install() -> bool:
    """Patch triton's interpreter once per process; True if installed (now or before)."""
    global _installed
    if _installed:
        return True
    if os.environ.get("MUPOPT_TEST_INTERPRETER_SPEED") == "0":
        return False
    try:
        import triton.language as tl
        from triton.runtime import interpreter as it
    except Exception:  # noqa: BLE001 - no triton, or another layout: nothing to speed up
        return False
    grid_call = getattr(getattr(it, "GridExecutor", None), "__call__", None)
    fn_call = getattr(getattr(it, "InterpretedFunction", None), "__call__", None)
    try:
        expected = "_patch_lang(self.fn)" in inspect.getsource(fn_call) and "_patch_lang(self.fn)" in inspect.getsource(grid_call)
    except (OSError, TypeError):
        expected = False
    if not expected or not hasattr(it, "InterpreterError"):
        return False

    state = {"depth": 0, "patched": frozenset()}
    langs_of: dict[int, frozenset] = {}

    def langs(fn) -> frozenset:
        key = id(fn.__globals__)
        if key not in langs_of:
            langs_of[key] = frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))
        return langs_of[key]

    def launch(self, *args, **kwargs):
        if state["depth"] == 0:  # what this launch's own patch covers
            state["patched"] = langs(self.fn)
        state["depth"] += 1
        try:
            return grid_call(self, *args, **kwargs)
        finally:
            state["depth"] -= 1

    def device_call(self, *args, **kwargs):
        mine = langs(self.fn)
        if state["depth"] == 0 or not mine <= state["patched"]:
            if state["depth"]:  # patched from here to the launch's end, as triton leaves it
                state["patched"] = state["patched"] | mine
            return fn_call(self, *args, **kwargs)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # as triton's own device call does
            raise it.InterpreterError(repr(e)) from e

    it.GridExecutor.__call__ = launch
    it.InterpretedFunction.__call__ = device_call
    _installed = True
    return True
