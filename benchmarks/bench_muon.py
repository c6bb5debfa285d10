"""Muon (whole step and Newton-Schulz alone): every registered backend and peer x case x dtype (see conftest.py)."""

OPTIMIZERS = ("muon", "ns")


def test_step(bench_step):
    """Checked against the reference, then timed (bench_step does both)."""
