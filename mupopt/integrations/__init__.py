"""Adapters that let training frameworks use mupopt from their configuration (importing one
needs that framework; ``import mupopt`` imports none of them)."""
