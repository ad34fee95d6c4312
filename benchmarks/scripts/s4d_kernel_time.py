"""S4D kernel generation (pallas_kernels/long_conv/ssm.py `s4d_kernel`) at one H3-355M layer's size (D 1024, N 32
complex modes, L 2048), forward and backward: compiled temporary memory and seconds per call on this machine.

  PYTHONPATH=. python benchmarks/scripts/s4d_kernel_time.py
"""
import time, jax, jax.numpy as jnp
from pallas_kernels.long_conv import s4d_lin_init
from pallas_kernels.long_conv import ssm
D, N, L = 1024, 32, 2048
params = s4d_lin_init(jax.random.key(0), D, N)
w = jax.random.normal(jax.random.key(1), (L, D))
f = jax.jit(jax.value_and_grad(lambda p: jnp.sum(ssm.s4d_kernel(p, L) * w)))
c = f.lower(params).compile()
print("temp bytes", c.memory_analysis().temp_size_in_bytes / 2**20, "MiB")
jax.block_until_ready(f(params))
t = time.perf_counter(); [jax.block_until_ready(f(params)) for _ in range(3)]; print("fwd+bwd s", (time.perf_counter() - t) / 3)
