"""Benchmarks of the mupopt optimizers: every registered backend against the peers of
docs/benchmarks.md (torch's fused and foreach AdamW, torch.compile of our reference,
torch.optim.Muon, the reference backend), measured in one run on the same tensors, each result
checked against the reference backend before it is timed.

- :mod:`.model`    bytes per step of the elementwise optimizers, flop counts of the matrix parts
- :mod:`.cases`    the cases as shape lists, sized per device and mode
- :mod:`.timing`   median/p20/p80 with cold caches; copy bandwidth and matmul rate
- :mod:`.subjects` what is timed: our optimizers by backend, the torch peers, the compile peer
- :mod:`.check`    the correctness check against the reference
- :mod:`.runner`   the run: rows of one schema, ratios to every peer, docs/benchmarks.md targets
- :mod:`.report`   JSON/CSV, markdown, PNG, the tables of docs/benchmarks.md
- :mod:`.cli`      ``mupopt bench`` (``python -m mupopt.bench``)
"""
from .check import CheckFailed
from .runner import COLUMNS, OPTIMIZERS, Config, Row, run

__all__ = ["COLUMNS", "OPTIMIZERS", "CheckFailed", "Config", "Row", "run"]
