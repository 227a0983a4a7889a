"""sorsa-kernels: fast, exact SORSA (Singular Values and Orthonormal Regularized Singular
Vectors Adaptation, arXiv 2409.00055) layers, regularizer and init for PyTorch."""
from . import integrations, ops
from ._build_info import build_info
from .analysis import SpectralShiftCallback, SpectralTracker, spectral_shift
from .adapters import load_adapter, save_adapter
from .export import export_lora, merge_and_unload
from .init import init_layers, sorsa_decompose, svd_factors
from .layer import SORSAConv1D, SORSALinear
from .layer_4bit import SORSALinear4bit
from .ops import sorsa_linear
from .model import (apply_sorsa, disable_adapters, mark_only_sorsa_trainable, merge_sorsa,
                    print_trainable_parameters, sorsa_layers, sorsa_parameters, target_matcher,
                    unmerge_sorsa)
from .regularizer import calc_ortho, ortho_loss, orthonormal_grad_
from .ops.rsvd import rsvd
from .regularizer import SORSARegularizer
from .training import SORSACallback

from ._version import __version__

__all__ = [
    "SORSALinear", "SORSALinear4bit", "apply_sorsa", "integrations", "calc_ortho", "ortho_loss", "orthonormal_grad_", "merge_sorsa", "unmerge_sorsa",
    "sorsa_parameters", "mark_only_sorsa_trainable", "sorsa_layers", "sorsa_decompose", "svd_factors", "init_layers",
    "rsvd", "SORSARegularizer", "SORSACallback", "ops", "build_info", "__version__",
    "save_adapter", "load_adapter", "export_lora", "merge_and_unload",
    "SORSAConv1D", "disable_adapters", "print_trainable_parameters", "target_matcher",
    "sorsa_linear", "spectral_shift", "SpectralTracker", "SpectralShiftCallback",
]
