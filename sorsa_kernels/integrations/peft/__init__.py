"""PEFT integration: fused forward for PEFT LoRA / KaSA layers, batched SVD init, regularizer.

PEFT's ``lora.Linear`` computes ``base_layer(x) + scaling·lora_B(lora_A(dropout(x)))`` and, for
KaSA (``LoraConfig(kasa_config=KasaConfig())``), ``base_layer(x) + scaling·lora_B(lora_A(dropout(x))
⊙ lora_diag)``: both are our op ``x·Wᵀ + bias + scale·((drop(x)·Aᵀ)⊙S)·Bᵀ`` with ``W, bias`` the
base layer's, ``A = lora_A.weight``, ``B = lora_B.weight``, ``S = lora_diag`` (KaSA) or a constant,
non-trainable vector of ones (LoRA; PiSSA and OLoRA only change the init, not the forward).

* :func:`accelerate` swaps the class of every servable ``lora.Linear`` for a subclass whose
  ``forward`` calls :func:`sorsa_kernels.ops.linear.sorsa_linear`, and of QLoRA layers (PEFT's
  ``lora.Linear4bit`` on a bitsandbytes ``Linear4bit``) for one whose ``forward`` calls
  :func:`sorsa_kernels.ops.linear4bit.sorsa_linear_4bit` (base product on the dequantized 4-bit
  weight, adapter by the op; PEFT gives 4-bit layers no KaSA); parameters, state dict,
  ``save_pretrained`` / ``PeftModel.from_pretrained``, merge/unmerge, ``disable_adapter`` and
  ``set_adapter`` are PEFT's own. Each call re-checks the layer's state and falls back to PEFT's
  forward when it cannot be served *now* (adapters disabled or merged, several active adapters,
  mixed-batch ``adapter_names``, a pending KaSA truncation, unsupported dtypes).
  :func:`unaccelerate` restores the original class.
* :func:`fast_svd_init` batches PEFT's PiSSA SVDs (``init_lora_weights="pissa"`` /
  ``"pissa_niter_K"``) and KaSA's base-weight truncation SVDs through
  :func:`sorsa_kernels.init.svd_factors` (one call per weight shape and rank).
* :func:`lora_ortho_loss`, :func:`lora_orthonormal_grad_` (SORSA's regularizer) and :func:`kasa_loss`
  (KaSA's ``β·Σ lora_diag² + γ·Σ (‖BᵀB−I‖_F + ‖AAᵀ−I‖_F)``, equal to PEFT's
  ``LoraModel._get_kasa_loss``) on PEFT parameters through the fused regularizer.
* :func:`export_plain_lora` writes any of these adapters as a plain PEFT LoRA for the original base.

One module per job: :mod:`.forward`, :mod:`.init`, :mod:`.regularizer`, :mod:`.export`.
"""
from .export import export_plain_lora
from .forward import AccelerateReport, AcceleratedLoraLinear, accelerate, servable_reason, unaccelerate
from .init import fast_svd_init
from .regularizer import kasa_loss, lora_ortho_loss, lora_orthonormal_grad_

# names before 0.1.0's split: still importable, with a DeprecationWarning
_RENAMED = {"ortho_loss": "lora_ortho_loss", "orthonormal_grad_": "lora_orthonormal_grad_",
            "export_lora": "export_plain_lora"}


def __getattr__(name: str):
    if name in _RENAMED:
        import warnings
        new = _RENAMED[name]
        warnings.warn(f"sorsa_kernels.integrations.peft.{name} is now {new} (sorsa_kernels.{name} is the "
                      "SORSA-model function of that name)", DeprecationWarning, stacklevel=2)
        return globals()[new]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["accelerate", "unaccelerate", "AccelerateReport", "AcceleratedLoraLinear", "fast_svd_init",
           "lora_ortho_loss", "lora_orthonormal_grad_", "kasa_loss", "servable_reason", "export_plain_lora"]
