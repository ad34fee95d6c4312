"""LoLCATs (sliding-window softmax + linear attention, one normaliser): the public sequence op, its decode step,
the state they carry and the feature maps."""

from pallas_kernels.lolcats.api import (LolcatsState, evicted_key, lolcats_attention, lolcats_decode_step,
                                        lolcats_prefill_state)

__all__ = ["LolcatsState", "evicted_key", "lolcats_attention", "lolcats_decode_step", "lolcats_prefill_state"]
