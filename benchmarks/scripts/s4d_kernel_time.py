"""S4D kernel generation (pallas_kernels/long_conv/ssm.py `s4d_kernel`) at one H3-355M layer's size (D 1024, N 32
complex modes, L 2048), forward and backward: compiled temporary memory and seconds per call on this machine.

  PYTHONPATH=. python benchmarks/scripts/s4d_kernel_time.py
"""
import time

import jax
import jax.numpy as jnp

from pallas_kernels.long_conv import s4d_lin_init, ssm

D, N, L = 1024, 32, 2048
params = s4d_lin_init(jax.random.key(0), D, N)
w_LD = jax.random.normal(jax.random.key(1), (L, D))
fwd_bwd = jax.jit(jax.value_and_grad(lambda p: jnp.sum(ssm.s4d_kernel(p, L) * w_LD)))
compiled = fwd_bwd.lower(params).compile()
print(f"temporaries {compiled.memory_analysis().temp_size_in_bytes / 2**20:.1f} MiB")
jax.block_until_ready(fwd_bwd(params))  # compiles and warms up
start = time.perf_counter()
for _ in range(3):
  jax.block_until_ready(fwd_bwd(params))
print(f"fwd+bwd {(time.perf_counter() - start) / 3:.3f} s")
