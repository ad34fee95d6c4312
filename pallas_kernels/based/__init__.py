"""Based (Taylor linear attention): the public sequence op, its decode step and the state they carry."""

from pallas_kernels.based.api import based_decode_step, based_linear_attention
from pallas_kernels.based.reference import BasedState

__all__ = ["BasedState", "based_decode_step", "based_linear_attention"]
