"""The recurrent and convolutional mixers (BASED, BaseConv, H3, Hyena) against the Mixer contract: causality,
prefill + step-by-step decode equal to the parallel form (ragged prompts included), implementation agreement,
deterministic init, config validation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.layers.base_conv import BaseConv, BaseConvConfig
from jaxlm.layers.based import Based, BasedConfig
from jaxlm.layers.h3 import H3, H3Config
from jaxlm.layers.hyena import Hyena, HyenaConfig
from jaxlm.layers.ssm_param import SSMParam
from pallas_kernels.long_conv import s4d_kernel
from tests.tolerances import assert_close, normal

B, T, D = 2, 12, 16

CONFIGS = {
    "based": (Based, BasedConfig(D, num_heads=2, feature_dim=4, chunk=4)),
    "based_unnormalized_rms": (Based, BasedConfig(D, num_heads=2, feature_dim=4, chunk=4, normalize=False,
                                                  norm="rms")),
    "base_conv": (BaseConv, BaseConvConfig(D)),
    "h3": (H3, H3Config(D, state_dim=8)),  # 8 shift taps < T: the shift SSM forgets within the test
    "h3_bilinear_inv": (H3, H3Config(D, state_dim=8, discretization="bilinear", init="inv")),
    "h3_head_dim4": (H3, H3Config(D, state_dim=8, head_dim=4)),  # 4 heads: 64 diagonal-SSM channels
    "hyena": (Hyena, HyenaConfig(D, max_length=16, filter_order=8, emb_dim=5)),
    "hyena_order3": (Hyena, HyenaConfig(D, max_length=16, order=3, filter_order=8, emb_dim=5)),
}
NAMES = list(CONFIGS)
# Implementations by name: "reference" for every op; "direct" (the Toeplitz product) for the long convs, whose
# FFT form cannot give exact zeros above the diagonal.
REFERENCE = {"short_conv_implementation": "reference", "implementation": "reference"}


def make(name, seed=0, dtype=jnp.float32, **overrides):
  cls, config = CONFIGS[name]
  fields = {f.name for f in dataclasses.fields(config)}
  config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if k in fields})
  # Logical axis names without a mesh: annotate, do not place.
  with nnx.use_eager_sharding(False):
    return cls(config, dtype=dtype, rngs=nnx.Rngs(seed))


def _dependence_TS(mixer, rng):
  """|d (r_t · out[t]) / d x[s]| summed over channels, for a random r: [T, T] (one reverse pass per t)."""
  x = normal(rng, (1, T, D))
  r_TD = normal(rng, (T, D))
  jac_T1TD = jax.jit(jax.jacrev(lambda x: (mixer(x)[0] * r_TD).sum(-1)))(x)
  return np.abs(np.asarray(jac_T1TD)).sum(axis=(1, 3))


@pytest.mark.parametrize("name", NAMES)
def test_causal(name, rng):
  """d out[t] / d x[s] is exactly zero for s > t, and not zero for s = t and s = t - 1."""
  exact = {"implementation": "direct"} if name.startswith(("h3", "hyena")) else {}
  dep_TS = _dependence_TS(make(name, **exact), rng)
  assert (dep_TS[np.triu_indices(T, k=1)] == 0).all(), f"{name}: output depends on future inputs"
  assert (np.diag(dep_TS) > 0).all(), f"{name}: output ignores the current input"
  assert (np.diag(dep_TS, k=-1) > 0).all(), f"{name}: output ignores the previous input"


@pytest.mark.parametrize("name", ["h3", "hyena"])
def test_fft_form_is_causal_to_rounding(name, rng):
  """The FFT form mixes every position in rounding only: future dependence stays at float32 noise."""
  dep_TS = _dependence_TS(make(name), rng)
  assert dep_TS[np.triu_indices(T, k=1)].max() <= 1e-5 * dep_TS.max()


def _poisoned_prompt(x_BTE, lengths, rng):
  """x with fresh junk after each row's length (what the padding holds must not matter)."""
  prompt = np.array(x_BTE)
  for b, n in enumerate(lengths):
    prompt[b, n:] = rng.standard_normal(prompt[b, n:].shape)
  return jnp.asarray(prompt)


# Per-row prompt lengths: equal, ragged, and an empty row beside a full one.
LENGTHS = [(5, 5), (2, 9), (0, T)]


@pytest.mark.parametrize("name", NAMES)
def test_prefill_then_decode_matches_parallel(name, rng):
  mixer = make(name)
  x = normal(rng, (B, T, D))
  expected = np.asarray(mixer(x))
  # Prompts padded to T and a cache of T: one compilation of each for every length set.
  prefill = nnx.jit(lambda mixer, x_BTE, lengths_B: mixer.prefill(x_BTE, mixer.init_cache(B, T), lengths_B))
  decode = nnx.jit(lambda mixer, x_BE, cache: mixer.decode(x_BE, cache))
  rows = np.arange(B)
  for lengths in LENGTHS:
    y_prompt, cache = prefill(mixer, _poisoned_prompt(x, lengths, rng), jnp.asarray(lengths, jnp.int32))
    for b, n in enumerate(lengths):
      assert_close(y_prompt[b, :n], expected[b, :n], dtype=jnp.float32, reduction_len=T,
                   name=f"{lengths=}: prefill row {b}")
    for step in range(T - min(lengths)):
      position_B = np.minimum(np.asarray(lengths) + step, T - 1)  # finished rows repeat their last token
      y_BE, cache = decode(mixer, x[rows, position_B], cache)
      for b in rows[np.asarray(lengths) + step < T]:
        assert_close(y_BE[b], expected[b, position_B[b]], dtype=jnp.float32, reduction_len=T,
                     name=f"{lengths=}: decode row {b} position {position_B[b]}")


@pytest.mark.parametrize("name", NAMES)
def test_reference_and_auto_agree(name, rng):
  x = normal(rng, (B, T, D))
  auto = make(name)(x)
  reference = make(name, **REFERENCE)(x)
  assert_close(reference, auto, dtype=jnp.float32, reduction_len=T)
  if name.startswith(("h3", "hyena")):
    assert_close(make(name, implementation="direct")(x), auto, dtype=jnp.float32, reduction_len=T)


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_compute_follows_float32(name, rng):
  x = normal(rng, (B, T, D))
  y32 = np.asarray(make(name)(x), np.float64)
  y16 = make(name, dtype=jnp.bfloat16)(x.astype(jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16
  rel = np.linalg.norm(np.asarray(y16, np.float64) - y32) / np.linalg.norm(y32)
  assert rel < 5e-2, f"{name}: bf16 output differs from float32 by {rel:.3f}"


@pytest.mark.parametrize("name", NAMES)
def test_init_is_deterministic_per_seed(name):
  same = jax.tree.leaves(nnx.state(make(name, seed=3), nnx.Param))
  again = jax.tree.leaves(nnx.state(make(name, seed=3), nnx.Param))
  other = jax.tree.leaves(nnx.state(make(name, seed=4), nnx.Param))
  assert all(np.array_equal(a, b) for a, b in zip(same, again))
  assert not all(np.array_equal(a, b) for a, b in zip(same, other))


@pytest.mark.parametrize("cls, kwargs, field", [
    (BasedConfig, dict(d_model=16, num_heads=3), "num_heads"),
    (BasedConfig, dict(d_model=16, num_heads=2, feature_dim=65), "feature_dim"),
    (BasedConfig, dict(d_model=16, num_heads=2, chunk=0), "chunk"),
    (BasedConfig, dict(d_model=16, num_heads=2, norm="layer"), "norm"),
    (BasedConfig, dict(d_model=16, num_heads=2, eps=-1.0), "eps"),
    (BaseConvConfig, dict(d_model=16, kernel_size=1), "kernel_size"),
    (BaseConvConfig, dict(d_model=16, expand=0), "expand"),
    (H3Config, dict(d_model=16, state_dim=7), "state_dim"),
    (H3Config, dict(d_model=16, discretization="euler"), "discretization"),
    (H3Config, dict(d_model=16, init="random"), "init"),
    (H3Config, dict(d_model=16, head_dim=3), "head_dim"),
    (H3Config, dict(d_model=16, dt_min=0.1, dt_max=0.01), "dt_min"),
    (HyenaConfig, dict(d_model=16, max_length=8, order=1), "order"),
    (HyenaConfig, dict(d_model=16, max_length=8, emb_dim=4), "emb_dim"),
    (HyenaConfig, dict(d_model=16, max_length=8, short_kernel=1), "short_kernel"),
    (HyenaConfig, dict(d_model=16, max_length=0), "max_length"),
])
def test_config_validation_names_the_field(cls, kwargs, field):
  with pytest.raises(ValueError, match=field):
    cls(**kwargs)


def test_hyena_rejects_sequences_beyond_its_filters(rng):
  mixer = make("hyena")  # max_length 16
  with pytest.raises(ValueError, match="max_length"):
    mixer(normal(rng, (1, 17, D)))
  with pytest.raises(ValueError, match="max_length"):
    mixer.init_cache(1, 17)


@pytest.mark.parametrize("name", ["h3", "hyena"])
def test_long_convolutions_refuse_packed_documents(name, rng):
  with pytest.raises(NotImplementedError, match="segment_ids"):
    make(name)(normal(rng, (1, T, D)), segment_ids=jnp.zeros((1, T), jnp.int32))


@pytest.mark.parametrize("name", ["based", "base_conv"])
def test_packed_documents_do_not_see_each_other(name, rng):
  mixer = make(name)
  x = normal(rng, (1, T, D))
  segment_ids = jnp.asarray([[0] * 5 + [1] * (T - 5)], jnp.int32)
  packed = mixer(x, segment_ids=segment_ids)
  assert_close(packed[:, :5], mixer(x[:, :5]), dtype=jnp.float32, reduction_len=T)
  assert_close(packed[:, 5:], mixer(x[:, 5:]), dtype=jnp.float32, reduction_len=T)


def test_based_prefill_state_counts_exactly_the_prompt(rng):
  """The state after a padded prefill equals that of each row's prompt alone: padding adds nothing, not even to
  the order-0 count that phi(k) = [1, …] would add."""
  mixer = make("based")
  x = normal(rng, (B, T, D))
  lengths = (3, 8)
  _, state = mixer.prefill(_poisoned_prompt(x, lengths, rng), mixer.init_cache(B, T), jnp.asarray(lengths))
  for b, n in enumerate(lengths):
    _, alone = mixer.prefill(x[b:b + 1, :n], mixer.init_cache(1, T), jnp.asarray([n]))
    for field, got, want in zip(state._fields, state, alone):
      assert_close(got[b], want[0], dtype=jnp.float32, reduction_len=n, name=field)
  np.testing.assert_array_equal(np.asarray(state.z0_BH), np.asarray(lengths, np.float32)[:, None].repeat(2, 1))


@pytest.mark.parametrize("normalize, norm, factor", [(False, "rms", 1.0), (False, None, 3.0), (True, None, 3.0)])
def test_based_output_scale_in_values(normalize, norm, factor, rng):
  """Based is linear in v (a weighted sum, or mean when normalised), and W_o is linear, so scaling W_v by 3
  scales the output by 3; the per-head RMSNorm of the unnormalised variant takes that scale out again."""
  mixer = make("based", normalize=normalize, norm=norm)
  x = normal(rng, (B, T, D))
  before = np.asarray(mixer(x))
  mixer.v_proj.kernel[...] = 3.0 * mixer.v_proj.kernel[...]
  assert_close(mixer(x), factor * before, dtype=jnp.float32, reduction_len=T)


def test_h3_heads_follow_their_definition(rng):
  """H3 with head dim P against its equations in numpy float64: per head u_ij = k̃_i v_j, s = k_diag * u + D u
  (the head's impulse response, shared by its P² channels), y_j = Σ_i q_i s_ij, out = W_o y + b_o."""
  mixer = make("h3_head_dim4", implementation="direct", short_conv_implementation="reference")
  P, heads = 4, D // 4
  x = normal(rng, (B, T, D))
  q, k, v = (np.asarray(a, np.float64).reshape(B, T, heads, P) for a in mixer._qkv(x))
  # k̃ from the layer's shift SSM (a short convolution, tested on its own); the heads are what this test checks.
  k_shift = np.asarray(mixer._shift(jnp.asarray(k.reshape(B, T, D), jnp.float32), mixer.shift_skip_D[...]),
                       np.float64).reshape(B, T, heads, P)
  k_diag_TH = np.asarray(s4d_kernel(mixer._s4d(), T), np.float64)
  skip_H = np.asarray(mixer.skip_D[...], np.float64)
  u = k_shift[..., :, None] * v[..., None, :]  # [B, T, H, P, P]
  s = np.zeros_like(u)
  for t in range(T):
    s[:, t] = np.einsum("th,bthij->bhij", k_diag_TH[t::-1], u[:, :t + 1]) + skip_H[:, None, None] * u[:, t]
  y = np.einsum("bthi,bthij->bthj", q, s).reshape(B, T, D)
  w, b = (np.asarray(a, np.float64) for a in (mixer.out_proj.kernel[...], mixer.out_proj.bias[...]))
  assert_close(mixer(x), y @ w + b, dtype=jnp.float32, reduction_len=T * P, name="H3 heads")


def test_ssm_parameters_are_float32_ssm_params():
  mixer = make("h3", dtype=jnp.bfloat16)
  ssm = nnx.state(mixer, SSMParam)
  names = {str(path[-1]) for path, _ in nnx.to_flat_state(ssm)}
  assert {"shift_taps_ND", "log_dt_D", "log_neg_real_DN", "C_re_DN"} <= names
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(ssm))
  assert "skip_D" not in names and "kernel" not in names
  hyena_ssm = nnx.state(make("hyena"), SSMParam)
  assert {"filter_w_in_EF", "filter_freq_F"} <= {str(path[-1]) for path, _ in nnx.to_flat_state(hyena_ssm)}
