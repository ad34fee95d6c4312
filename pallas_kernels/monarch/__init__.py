"""Monarch (block-diagonal butterfly) linear maps: multiply, initialise, and convert to and from dense."""

from pallas_kernels.monarch.api import dense_to_monarch, monarch_init, monarch_linear, monarch_to_dense

__all__ = ["dense_to_monarch", "monarch_init", "monarch_linear", "monarch_to_dense"]
