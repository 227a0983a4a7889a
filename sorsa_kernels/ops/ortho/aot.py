"""AOT compile cases of the orthonormal regularizer's launcher (see :mod:`sorsa_kernels.aot_check`):
its real launch path on meta tensors, every (dtype, layout, offset width) program."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from ...aot_check import DTYPES, Case
from .launch import ortho_triton_backward, ortho_triton_forward
from .reference import grad_coefs

# kernel name -> constexpr that says whether its loads are 16-byte vectors: every ortho kernel
# carries its own VEC flag (strides come from a table), so none is listed here
PIPELINE_OPERANDS: dict = {}
SMEM_FALLBACK: dict = {}


def ortho_triton_(mats: Sequence[torch.Tensor], is_b: Sequence[bool], squared: bool, coef) -> torch.Tensor:
    """Per-matrix regularizer values (fp32, shape (n,)); adds ``coef ·`` their gradient into ``.grad``
    of every matrix that requires grad (created where None). O(1) launches per group, no host sync."""
    norms, state = ortho_triton_forward(mats, is_b)
    ortho_triton_backward(mats, state, grad_coefs(norms, squared, coef), inplace=True)
    return norms * norms if squared else norms


def adapter_lists(device: str = "meta") -> List[Tuple[List[torch.Tensor], List[bool]]]:
    """Representative adapter lists for compiling every (dtype, layout, offset width) program
    ahead of time: Llama-2-7B shapes at r = 128 (A row-major → LAYOUT 0, B row-major → Bᵀ
    LAYOUT 1), a ragged general-strided one (LAYOUT 2) and rows past element 2³¹ (I64), per
    dtype. Call ``ortho_triton_(mats, is_b, False, 1.0)`` on each with the launches intercepted
    (it reads no tensor data: works on the meta device)."""
    cases = []
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        def mk(shape, stride=None):
            stride = stride or (shape[1], 1)
            return torch.empty_strided(shape, stride, dtype=dt, device=device, requires_grad=True)
        mats = [mk((128, 4096)), mk((4096, 128)), mk((128, 11008)), mk((11008, 128)),
                mk((77, 333), (68, 2)),          # general strides, ragged r
                mk((3, 64), (2 ** 30 + 64, 1))]  # an offset past 2³¹: 64-bit program
        cases.append((mats, [False, True, False, True, False, False]))
    return cases


def cases(dtypes: Sequence[str]) -> List[Case]:
    """One case per dtype in ``dtypes`` (``"bf16"``, ``"fp16"``, ``"fp32"``)."""
    out = []
    names = {v: k for k, v in DTYPES.items()}
    for mats, is_b in adapter_lists("meta"):
        dt = names[str(mats[0].dtype).split(".")[-1]]
        if dt in dtypes:
            out.append(Case(f"ortho {dt} llama7b r128", "ortho", dt,
                            (lambda m=mats, b=is_b: ortho_triton_(m, b, False, 1.0))))
    return out
