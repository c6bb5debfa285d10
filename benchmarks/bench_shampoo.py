"""Shampoo (whole step and batched inverse roots): every registered backend and peer x case x dtype (see conftest.py)."""

OPTIMIZERS = ("shampoo", "roots")


def test_step(bench_step):
    """Checked against the reference, then timed (bench_step does both)."""
