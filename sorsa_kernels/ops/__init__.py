"""The ops, one package each; importing a package registers its :class:`OpSpec` with
:mod:`sorsa_kernels._backend`. Each has a plain-torch reference next to it (``reference.py``)."""
from . import linear, linear4bit, ortho, rsvd
from .linear import sorsa_linear, sorsa_linear_naive
from .linear4bit import sorsa_linear_4bit, sorsa_linear_4bit_naive
from .ortho import calc_ortho_naive

__all__ = ["sorsa_linear", "sorsa_linear_naive", "sorsa_linear_4bit", "sorsa_linear_4bit_naive", "linear4bit", "calc_ortho_naive", "linear", "ortho", "rsvd"]
