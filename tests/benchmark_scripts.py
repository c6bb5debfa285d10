"""The scripts of benchmarks/ imported as modules, for the tests of their machinery."""
from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def load(name: str) -> ModuleType:
    """benchmarks/<name>.py as module ``name``, registered in sys.modules while it runs and after
    (its dataclasses resolve their annotations through it); removed again if it fails."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCHMARKS, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[name]
        raise
    return mod
