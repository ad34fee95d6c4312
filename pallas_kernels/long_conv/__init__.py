"""Gated causal long convolutions (H3, Hyena) and the filters they use: S4D, shift SSM, Hyena implicit filter."""

from pallas_kernels.long_conv.api import long_conv
from pallas_kernels.long_conv.hyena import HyenaFilterParams, hyena_filter, hyena_filter_init
from pallas_kernels.long_conv.ssm import (S4DParams, s4d_inv_init, s4d_kernel, s4d_lin_init, shift_ssm_kernel)

__all__ = ["long_conv", "s4d_kernel", "shift_ssm_kernel", "hyena_filter", "S4DParams", "s4d_lin_init",
           "s4d_inv_init", "HyenaFilterParams", "hyena_filter_init"]
