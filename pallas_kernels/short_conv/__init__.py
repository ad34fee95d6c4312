"""Short causal depthwise convolution (kernel width 2..4): parallel form over a sequence and the decode step."""

from pallas_kernels.short_conv.api import short_conv, short_conv_step

__all__ = ["short_conv", "short_conv_step"]
