"""One table of optimizers drives the contract tests: class, test hyperparameters, named reference."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

import mupopt
from mupopt.testing import ORACLES


@dataclass(frozen=True)
class Case:
    name: str  # rule / registry name
    cls: type
    kwargs: dict
    # The named reference library as (module name, factory), or None (LAMB).
    reference: Callable | None = None
    step_kwargs: dict = field(default_factory=dict)

    @property
    def oracle(self):
        return ORACLES[self.name]


def _torch_adamw(params, **kw):
    return torch.optim.AdamW(params, **kw)


def _adopt(params, **kw):
    import pytest

    adopt = pytest.importorskip("adopt", reason="torch-adopt is a test extra: pip install -e .[test]")
    from mupopt.verify import reference_problem

    problem = reference_problem("adopt")
    if problem is not None:
        pytest.skip(problem)
    return adopt.ADOPT(params, decouple=True, **kw)


def _sophia(params, **kw):
    import pytest

    sophia_opt = pytest.importorskip("sophia_opt", reason="sophia-opt is a test extra: pip install -e .[test]")
    return sophia_opt.SophiaG(params, **kw)


CASES = {
    "adamw": Case("adamw", mupopt.AdamW, dict(lr=1e-2, weight_decay=0.1), _torch_adamw),
    "adopt": Case("adopt", mupopt.ADOPT, dict(lr=1e-2, weight_decay=0.1), _adopt),
    "lamb": Case("lamb", mupopt.LAMB, dict(lr=1e-2, weight_decay=0.1)),
    "sophia": Case("sophia", mupopt.SophiaG, dict(lr=1e-2, weight_decay=0.1, rho=0.04), _sophia, {"bs": 64}),
}
