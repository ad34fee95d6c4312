"""Softmax attention (causal, sliding-window, packed segments, GQA/MQA, softcap) and KV-cache decode."""

from pallas_kernels.attention.api import attention, attention_decode

__all__ = ["attention", "attention_decode"]
