"""``sk.rsvd`` with its defaults (tol = 1 %): speed against ``torch.linalg.svd`` and accuracy
against a float64 SVD, with the iterations it chose per case.

* ``speed``: a stack of LLM-like 2048² matrices (``sorsa_kernels.synthetic``), r = 64; rounds
  interleave the full SVD (``full_matrices=False``, what sorsa 1.0.1's init runs) and ``sk.rsvd``,
  so the ratio of each round is measured under the same machine load.
* ``accuracy``: one matrix per Llama-2-7B shape (4096², 11008×4096), r = 128, LLM-like
  (σᵢ ∝ i^-0.5) and flatter (i^-0.25) spectra, fp32 work and emulated bf16 ``Wᵀ·Q`` products
  (the CUDA default); and the 28 real pretrained weights of ``examples/assets/tiny_base``, r = 16.

Run: ``python benchmarks/rsvd_default.py [--count 16] [--rounds 2] [--skip-speed] [--skip-accuracy]``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def _err(S: torch.Tensor, exact: torch.Tensor) -> float:
    return ((S.double() - exact).abs() / exact).max().item()


def speed(count: int, rounds: int) -> None:
    import sorsa_kernels as sk
    from sorsa_kernels.synthetic import exact_sigmas, synthetic_weights

    W = synthetic_weights(count, 2048, 2048, seed=0)
    ratios = []
    for i in range(rounds):
        t = time.perf_counter()
        torch.linalg.svd(W, full_matrices=False)
        t_svd = time.perf_counter() - t
        info = {}
        t = time.perf_counter()
        _, S, _ = sk.rsvd(W, 64, seed=0, info=info)
        t_rsvd = time.perf_counter() - t
        ratios.append(t_svd / t_rsvd)
        print(f"round {i}: torch.linalg.svd {t_svd:.2f} s, sk.rsvd {t_rsvd:.2f} s ({ratios[-1]:.1f}x faster), "
              f"iterations {info['iterations']}, estimate {info['error_estimate']:.2%}", flush=True)
    ex = exact_sigmas(W, 64)
    print(f"speed: {count}x 2048x2048 r=64: {statistics.median(ratios):.1f}x faster than torch.linalg.svd "
          f"(rounds {', '.join(f'{r:.1f}' for r in ratios)}), max sigma error {_err(S, ex):.2%}", flush=True)


def accuracy() -> None:
    import sorsa_kernels as sk
    from sorsa_kernels.synthetic import exact_sigmas, synthetic_weights

    print(f"{'case':<40} {'iters':>5} {'estimate':>9} {'error':>7} {'seconds':>8}")
    for m, n in ((4096, 4096), (11008, 4096)):
        for family in ("llm", "flat"):
            W = synthetic_weights(1, m, n, seed=0, family=family)
            ex = exact_sigmas(W, 128)
            for it_dt, name in ((None, "fp32"), (torch.bfloat16, "bf16 emulated")):
                info = {}
                t = time.perf_counter()
                _, S, _ = sk.rsvd(W, 128, seed=0, iter_dtype=it_dt, info=info)
                dt = time.perf_counter() - t
                print(f"{f'{m}x{n} r=128 {family} {name}':<40} {info['iterations']:>5} "
                      f"{info['error_estimate']:>9.2%} {_err(S, ex):>7.2%} {dt:>8.2f}", flush=True)
    from safetensors.torch import load_file
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "assets", "tiny_base", "model.safetensors")
    mats = [v for k, v in sorted(load_file(path).items()) if v.dim() == 2 and "embed" not in k]
    errs, iters = [], []
    for W in mats:
        info = {}
        _, S, _ = sk.rsvd(W, 16, seed=0, info=info)
        errs.append(_err(S, exact_sigmas(W, 16)))
        iters.append(info["iterations"])
    print(f"{f'tiny_base: {len(mats)} real weights r=16':<40} {min(iters)}-{max(iters):<3} {'':>9} "
          f"{max(errs):>7.2%}  (median {statistics.median(errs):.3%})", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-accuracy", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if not args.skip_accuracy:
        accuracy()
    if not args.skip_speed:
        speed(args.count, args.rounds)


if __name__ == "__main__":
    main()
