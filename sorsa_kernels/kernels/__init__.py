"""Triton kernels (imported only when Triton is usable; see sorsa_kernels._backend)."""
