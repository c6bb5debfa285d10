"""``python -m mupopt.bench``: the same command as ``mupopt bench``."""
import sys

from .cli import standalone

sys.exit(standalone())
