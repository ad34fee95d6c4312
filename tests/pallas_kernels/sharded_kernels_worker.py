"""Run in its own process with 8 host devices (see test_sharded_kernels.py): kernels inside a jitted function under
a (data 2, fsdp 2, tensor 2) mesh, inputs sharded over batch and heads, must equal the unsharded reference and
must run through shard_map. Prints one line per check; exits non-zero on a mismatch."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from pallas_kernels.attention import api as attention_api
from pallas_kernels.based import api as based_api


def main() -> int:
  assert len(jax.devices()) == 8, jax.devices()
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
  rng = np.random.default_rng(int(sys.argv[1]))
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
  heads_spec = P(("data", "fsdp"), None, "tensor", None)
  failures = 0

  def check(name, fn, args, want):
    nonlocal failures
    with jax.set_mesh(mesh):
      jitted = jax.jit(fn)
      got = jitted(*args)
      uses_shard_map = "shard_map" in str(jax.make_jaxpr(fn)(*args))
    err = max(float(jnp.max(jnp.abs(g - w))) for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    ok = err < 1e-4 and uses_shard_map
    failures += not ok
    print(f"{name}: max error {err:.2e}, shard_map {uses_shard_map}: {'ok' if ok else 'FAIL'}")

  q, k, v = normal(4, 24, 4, 16), normal(4, 24, 2, 16), normal(4, 24, 2, 16)
  segment_ids = jnp.asarray(np.sort(rng.integers(0, 3, (4, 24)), axis=1), jnp.int32)
  options = dict(causal=True, window=9, segment_ids=segment_ids)
  want = attention_api.attention(q, k, v, implementation="reference", **options)
  check("attention", lambda q, k, v, s: attention_api.attention(q, k, v, causal=True, window=9, segment_ids=s,
                                                                implementation="pallas"),
        (put(q, heads_spec), put(k, heads_spec), put(v, heads_spec), put(segment_ids, P(("data", "fsdp")))),
        want)

  qf, kf, vb = normal(4, 40, 2, 8) * 0.5, normal(4, 40, 2, 8) * 0.5, normal(4, 40, 2, 16)
  want = based_api.based_linear_attention(qf, kf, vb, chunk=16, return_final_state=True,
                                          implementation="reference")
  check("based", lambda q, k, v: based_api.based_linear_attention(q, k, v, chunk=16, return_final_state=True,
                                                                  implementation="pallas"),
        (put(qf, heads_spec), put(kf, heads_spec), put(vb, heads_spec)), want)
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
