"""Head dims the Hopper tiles do not take (70, 80, 96, 112, 16) run through them zero-padded to 64/128.

On CPU: the padding wrapper's math (scale of the original D, sliced output, gradients through pad and slice)
against the reference, with the portable kernel or the reference standing in for the Hopper kernel; the padded
Hopper kernels lower for sm90; `auto` takes the Hopper kernel for the head dim of every preset of ours and
refuses head dims above 128 with the reason. On an sm90 GPU (marked gpu): the padded Hopper kernels against the
reference, values and gradients.

Letters: B batch, T query length, S key length, H query heads, K kv heads, D head dim.
"""

import math
from unittest import mock

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.attention import api, head_dim, hopper, pallas
from pallas_kernels.attention import reference as ref
from pallas_kernels.common import mosaic
from tests.pallas_kernels.test_attention_hopper import _shapes, _on_sm90
from tests.pallas_kernels.test_attention_kernel import _check_against_reference
from jaxlm.models import load_preset, preset_names


def test_padded_head_dim_is_the_next_kernel_tile():
  dims = (64, 128)
  assert [head_dim.padded_head_dim(d, dims) for d in (16, 64, 65, 70, 80, 96, 112, 128)] == [64, 64] + [128] * 6
  assert head_dim.padded_head_dim(129, dims) is None


def test_portable_kernel_padded_matches_reference(rng):
  """The wrapper around the portable kernel (interpret mode): padded to 128, same output, lse and gradients."""
  blocks = pallas.BlockSizes(16, 16, 16, 16, 16, 16)
  kernel_fn = lambda *args, **kw: head_dim.with_padded_head_dim(pallas.flash_attention, *args, padded_dim=128,
                                                                block_sizes=blocks, **kw)
  _check_against_reference(rng, kernel_fn, dict(window=9, window_right=4, D=80, T=40, S=40, H=4, K=1, softcap=5.0))


def _reference_in_place_of_hopper(seen: list):
  """A stand-in for hopper._attention (the custom_vjp'd kernels) that runs the reference on what it is given and
  records the head dim and scale it saw."""
  def attention(options, q, k, v, ids_BT, ids_BS):
    seen.append((q.shape[-1], options.scale))
    return ref.attention(q, k, v, segment_ids=ids_BT, kv_segment_ids=ids_BS, return_lse=True,
                         **options.mask_args())
  return attention


@pytest.mark.parametrize("case", [dict(causal=True, D=70, segments=True), dict(D=80, window=7, softcap=5.0),
                                  dict(causal=True, D=96, H=4, K=1)],
                         ids=["d70_causal_segments", "d80_window_softcap", "d96_mqa"])
def test_hopper_wrapper_pads_exactly(rng, case):
  """hopper.flash_attention with the reference in place of its kernels: the kernels get 64/128-wide inputs and
  the scale 1/sqrt(original D), and the result (values, lse, all gradients) equals the unpadded reference."""
  seen = []
  case = dict(dict(T=33, S=33, dtype=jnp.bfloat16), **case)
  with mock.patch.object(hopper, "_attention", _reference_in_place_of_hopper(seen)):
    _check_against_reference(rng, hopper.flash_attention, case)
  d = case["D"]
  assert seen and all(dim == (64 if d <= 64 else 128) for dim, _ in seen), seen
  assert all(scale == pytest.approx(1.0 / math.sqrt(d)) for _, scale in seen), seen


@pytest.mark.parametrize("dim", [70, 80, 96, 112])
def test_padded_forward_and_backward_lower_for_sm90(dim):
  args, options = _shapes(causal=True, D=dim, T=200, S=200, H=4, K=2, segments=True)

  def loss(q, k, v, q_ids, k_ids):
    out, lse = hopper.flash_attention(q, k, v, segment_ids=q_ids, kv_segment_ids=k_ids, return_lse=True,
                                      **options)
    assert out.shape == q.shape
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isinf(lse), 0.0, lse))

  text = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=("cuda",))(*args).mlir_module()
  for kernel in ("fwd", "dq", "dkv"):
    assert f"flash_attention_hopper_{kernel}_mosaic_gpu" in text, f"no Mosaic GPU {kernel} kernel at D={dim}"


def test_head_dims_above_128_are_refused_with_the_reason():
  q = jnp.zeros((1, 8, 2, 256), jnp.bfloat16)
  with pytest.raises(ValueError, match="head_dim=256"):
    hopper.flash_attention(q, q, q)
  with mock.patch.object(mosaic, "is_sm90", lambda: True):
    assert "shared memory" in hopper.supports(backend="gpu", head_dim=256, dtype=jnp.bfloat16)


def _preset_head_dims() -> dict[str, int]:
  """Head dim of every softmax-attention mixer of every 16-bit preset."""
  dims = {}
  for name in preset_names():
    config = load_preset(name)
    for mixer, mixer_config in config.mixer_configs().items():
      if hasattr(mixer_config, "resolved_head_dim") and config.dtype != "float32":
        dims[f"{name}/{mixer}"] = mixer_config.resolved_head_dim()
  return dims


def test_auto_takes_hopper_for_every_preset():
  dims = _preset_head_dims()
  assert {"transformer-1.3b/attention", "transformer-1.3b-fla/attention", "based-1.3b/sliding_window"} <= set(dims)
  with mock.patch.object(jax, "default_backend", lambda: "gpu"), mock.patch.object(mosaic, "is_sm90", lambda: True):
    for name, dim in dims.items():
      chosen = api.ATTENTION.select("auto", head_dim=dim, dtype=jnp.bfloat16, causal=True, segmented=True).name
      assert chosen == "hopper", f"{name}: head dim {dim} runs {chosen}"


# Shapes that cross block and CTA edges, at the padded head dims.
GPU_CASES = {
    "d70_causal": dict(causal=True, T=300, S=300, D=70, H=24, K=24, dtype=jnp.bfloat16),
    "d80_segments_gqa": dict(causal=True, segments=True, T=260, S=260, D=80, H=8, K=2, dtype=jnp.bfloat16),
    "d96_window_f16": dict(window=100, T=200, S=333, D=96, dtype=jnp.float16),
    "d112_sliding_window": dict(causal=True, window=128, T=400, S=400, D=112, dtype=jnp.bfloat16),
    "d16_softcap": dict(causal=True, softcap=5.0, T=100, S=100, D=16, dtype=jnp.bfloat16),
}


@pytest.mark.gpu
@_on_sm90
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_padded_hopper_matches_reference(rng, case):
  kernel_fn = lambda *args, **kw: api.attention(*args, implementation="hopper", **kw)
  _check_against_reference(rng, kernel_fn, GPU_CASES[case])
