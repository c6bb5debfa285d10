"""ADOPT: every registered backend and peer x case x dtype (see conftest.py)."""

OPTIMIZERS = ("adopt",)


def test_step(bench_step):
    """Checked against the reference, then timed (bench_step does both)."""
