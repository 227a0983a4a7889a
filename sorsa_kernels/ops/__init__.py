"""Functional ops. Each op has a plain-torch naive reference next to it (``*_naive``)."""
from .linear import sorsa_linear, sorsa_linear_naive
from .ortho import calc_ortho_naive, ortho_value_and_grads

__all__ = ["sorsa_linear", "sorsa_linear_naive", "calc_ortho_naive", "ortho_value_and_grads"]
