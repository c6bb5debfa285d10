"""Compiled backends of the mupopt optimizers (see mupopt.backends): Triton kernels in ``triton/``."""
