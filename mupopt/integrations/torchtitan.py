"""mupopt in torchtitan (PyTorch's LLM pre-training platform, 0.3.0): every optimizer and muP's
width information from the job's configuration, no code in the model or its ``parallelize_fn``.

torchtitan builds its optimizers in ``OptimizersContainer`` from a fixed table of names
(``_resolve_optimizer_factory``), after the model has been parallelised (FSDP2, TP, PP): its
parameters are then the DTensors the optimizer steps. :class:`MupOptimizersContainer` adds the
names ``mupopt.AdamW``, ``mupopt.ADOPT``, ``mupopt.LAMB``, ``mupopt.SophiaG``, ``mupopt.Muon``,
``mupopt.Shampoo`` to that table and, when its config names a base-shapes file
(:func:`mupopt.make_base_shapes` writes one), gives every parameter of every model part its width
information right there, before the optimizers are built: parameters are matched by name
(activation checkpointing's ``_checkpoint_wrapped_module`` and the like ignored), roles come from
the module types, and the global shape of a DTensor is what counts. A parameter the file does not
name raises :class:`mupopt.MupError` naming it. docs/distributed.md has the recipe::

    from torchtitan.components.optimizer import ParamGroupConfig
    from mupopt.integrations.torchtitan import MupOptimizersContainer

    def llama3_8b_mup() -> Trainer.Config:
        config = llama3_8b()
        config.optimizer = MupOptimizersContainer.Config(
            param_groups=[ParamGroupConfig(pattern=r".*", optimizer_name="mupopt.AdamW",
                                           optimizer_kwargs={"lr": 3e-4, "weight_decay": 0.1})],
            base_shapes="llama3.bsh",
        )
        return config

torchtitan's checkpoints save the optimizers' state flattened per parameter
(``state.<fqn>.<key>``); mupopt keeps each parameter's width record in its state, so the record
travels with its parameter and a resume needs no base shapes (docs/mup.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torchtitan.components.optimizer import OptimizersContainer

from .. import optim
from ..mup import set_base_shapes

# ParamGroupConfig.optimizer_name -> class.
OPTIMIZERS = {f"mupopt.{cls.__name__}": cls for cls in (optim.AdamW, optim.ADOPT, optim.LAMB, optim.SophiaG,
                                                         optim.Muon, optim.Shampoo)}
# torchtitan writes its implementation choice (Config.implementation) into every param group; it
# selects torch's kernels and means nothing to mupopt, which picks its backend itself (the
# optimizer keyword backend=, e.g. in optimizer_factory_kwargs_by_name).
_TORCH_IMPLEMENTATION_KEYS = ("fused", "foreach")


def _factory(cls):
    def build(param_groups: list[dict[str, Any]], **kwargs: Any):
        groups = [{k: v for k, v in g.items() if k not in _TORCH_IMPLEMENTATION_KEYS} for g in param_groups]
        return cls(groups, **kwargs)

    build.__name__ = build.__qualname__ = f"build_{cls.__name__}"
    return build


class MupOptimizersContainer(OptimizersContainer):
    """torchtitan's optimizer container with mupopt's optimizers registered (module docstring)."""

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        base_shapes: str | None = None
        """Path of the base shapes (mupopt.make_base_shapes(base, delta, path)): every parameter
        gets its muP width information from it. None: the parameters keep what they carry (no
        muP unless mupopt.set_base_shapes was called on the model)."""

        overrides: dict[str, str] = field(default_factory=dict)
        """{parameter name pattern: role} for parameters whose role the module type does not
        tell (mupopt.set_base_shapes' overrides)."""

    def __init__(self, config: Config, *, model_parts: list) -> None:
        if config.base_shapes is not None:
            for part in model_parts:
                # A pipeline stage holds part of the model the file was recorded from.
                set_base_shapes(part, config.base_shapes, overrides=config.overrides or None,
                                partial=len(model_parts) > 1)
        super().__init__(config, model_parts=model_parts)

    @staticmethod
    def _resolve_optimizer_factory(name: str):
        if name in OPTIMIZERS:
            return _factory(OPTIMIZERS[name])
        return OptimizersContainer._resolve_optimizer_factory(name)
