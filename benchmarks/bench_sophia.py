"""SophiaG (step and Hessian EMA): every registered backend and peer x case x dtype (see conftest.py)."""

OPTIMIZERS = ("sophia", "sophia_hessian")


def test_step(bench_step):
    """Checked against the reference, then timed (bench_step does both)."""
