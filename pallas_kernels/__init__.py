"""Operators of jaxlm, one folder each: reference.py (the jnp oracle), kernels, api.py (the public function)."""
