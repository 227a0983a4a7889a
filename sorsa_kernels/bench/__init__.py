"""Benchmarks behind ``sorsa-kernels bench``: ours vs sorsa 1.0.1 vs the floor, on this machine.

Rooms: :mod:`.cases` (what is measured: one source for the CLI and the pytest-benchmark
suites, collected from each registered op's bench module), :mod:`.timing` (interleaved rounds,
warm-up, ≥ 50 ms samples), :mod:`.runners` (what the op builders share), :mod:`.report` (ratios,
flags, tables, JSON, PNG). :func:`run` ties
them together with a progress bar and writes each result as it completes.
"""
from __future__ import annotations

import importlib
import platform
import sys
import time
from typing import Callable, List, Optional

import torch

from .cases import MODES, Case, cases, models, op_texts, plan
from .report import (LEGEND, Result, busy_warning, cross_check, details_table, format_row, from_json, plot, results_for_case,
                     to_json, verdict_table, write_json, DETAIL_HEAD)
from .runners import REF_FORMULA, REF_LAYER, Built, build, load_reference_layer, reference_layer
from .timing import ImplError, quartiles, time_interleaved

__all__ = ["MODES", "Case", "cases", "models", "op_texts", "plan", "Result", "run", "header", "header_text",
           "verdict_table", "details_table", "plot", "to_json", "from_json", "build", "time_interleaved",
           "load_reference_layer", "LEGEND", "measure_case", "quartiles"]


def _package_status(name: str) -> str:
    """What ``import name`` does here, in a few words: its version, "not installed", or the error."""
    import importlib.metadata
    import importlib.util
    if importlib.util.find_spec(name) is None:
        return "not installed"
    try:
        mod = importlib.import_module(name)
    except Exception as exc:  # e.g. sorsa 1.0.1's __init__ under transformers 5
        msg = str(exc).split(" (")[0]  # ImportError appends "(/long/path/__init__.py)"
        return f"installed, but `import {name}` fails: {type(exc).__name__}: {msg[:100]}"
    return getattr(mod, "__version__", None) or importlib.metadata.version(name)


def header(device: torch.device, mode: str) -> dict:
    """Facts printed above the tables and stored in the JSON."""
    from .._version import __version__
    try:
        import triton
        tv = triton.__version__
    except Exception:
        tv = "not installed"
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "sorsa_kernels": __version__, "mode": mode, "device": gpu or f"CPU ({platform.machine()})",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "triton": tv,
        "python": platform.python_version(),
        "reference": REF_LAYER + " for the linear rows" if reference_layer() is not None
        else REF_FORMULA + " (sorsa's layer.py was not found)",
        "sorsa": _package_status("sorsa"), "peft": _package_status("peft"),
    }


def header_text(h: dict) -> str:
    peft = h.get("peft", "not installed")
    lines = [f"sorsa-kernels {h['sorsa_kernels']} bench ({h['mode']}) on {h['device']}, {h['threads']} threads; "
             f"torch {h['torch']}, triton {h['triton']}, python {h['python']}",
             f"Reference: {h['reference']}; the regularizer reference is our copy of sorsa 1.0.1's calc_ortho "
             f"(sorsa here: {h.get('sorsa', 'unknown')}).",
             f"PEFT rows (PEFT's own lora.Linear, LoRA and KaSA, same shapes and dropout): " +
             (f"peft {peft}." if peft[:1].isdigit() else f"none, peft is {peft} (pip install peft).")]
    if h["device"].startswith("CPU"):
        lines.append("These are CPU numbers: the fused Triton/CUDA kernels need an NVIDIA GPU, so every 'ours' "
                     "row here runs the plain-PyTorch path (what backend='auto' runs on this machine).")
    lines.append(LEGEND)
    return "\n".join(lines)


def measure_case(case: Case, device: torch.device, rounds: int, min_sample_ms: float,
                 on_sample: Optional[Callable[[str, int, int], None]] = None) -> List[Result]:
    """Build ``case``, time its implementations interleaved and return its rows; an exception
    in one implementation (or in building the case) is recorded in the rows, never raised."""
    try:
        b: Built = build(case, device)
    except Exception as exc:
        return [Result(case.op, case.label, "(building the case)", "ours", None, error=f"{type(exc).__name__}: {exc}")]
    errors = {}
    single = b.single_shot
    try:
        # single-shot cases (init: seconds per call) get at most 3 rounds after their warm-up call
        n = 1 if "model" in case.params else min(rounds, 3) if single else rounds
        samples = time_interleaved(b.impls, device, rounds=n,
                                   min_sample_ms=0.0 if single else min_sample_ms,
                                   warmup=0 if single else 1, on_sample=on_sample)
    except ImplError as exc:
        samples = exc.samples
        errors = {n: f"{type(e).__name__}: {e}"[:300] for n, e in exc.errors.items()}
    extra = {n: dict(e) for n, e in b.extra.items()}
    if b.finish is not None:
        try:
            for n, e in b.finish().items():
                extra.setdefault(n, {}).update(e)
        except Exception as exc:  # the timings stand; the extra facts are missing
            errors.setdefault(b.primary, f"after timing: {type(exc).__name__}: {exc}"[:300])
    roles = dict(b.roles)
    for n in extra:
        roles.setdefault(n, "other")
    roles = {n: r for n, r in roles.items() if n in b.impls or "ms_override" in extra.get(n, {})}
    return results_for_case(case.op, case.label, roles, samples, extra, errors)


#: without a TTY (a log, CI, ``| tee``), a plain progress line at least this often during a case
HEARTBEAT_S = 5.0


def isatty(f) -> bool:
    try:
        return bool(f.isatty())
    except (AttributeError, ValueError):  # closed or file-like objects without isatty
        return False


def run(ops: Optional[List[str]] = None, mode: str = "default", dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device] = None, model: Optional[str] = None, json_path: Optional[str] = None,
        max_seconds: Optional[float] = None, progress: bool = True, rounds: Optional[int] = None,
        min_sample_ms: Optional[float] = None, stream=None) -> List[Result]:
    """Run the benchmark ``ops`` (default: all) in ``mode`` on ``device`` (default: the GPU when
    present). Each case's rows are printed to ``stream`` (default stderr, above the progress
    bar) and written to ``json_path`` as soon as the case completes. Cases left when
    ``max_seconds`` have passed are recorded as skipped. The tqdm bar is drawn only when stderr
    is a TTY; otherwise (logs: its ``\r`` redraws would litter them) ``progress`` prints one plain
    line per case to stderr, and a heartbeat line every :data:`HEARTBEAT_S` seconds within it."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    todo = cases(device, mode, dtype, ops, model)
    p = plan(device, mode)
    rounds = rounds or int(p["rounds"])
    min_sample_ms = p["min_sample_ms"] if min_sample_ms is None else min_sample_ms
    head = header(device, mode)
    stream = stream or sys.stderr
    bar = None
    if progress and isatty(sys.stderr):
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(todo), desc="bench", unit="case", file=sys.stderr, dynamic_ncols=True,
                       bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}] {postfix}")
        except ImportError:
            bar = None
    write = (bar.write if bar is not None else print)
    plain = progress and bar is None
    last = [time.perf_counter()]

    def say(msg: str) -> None:  # a plain progress line (non-TTY stderr)
        print(msg, file=sys.stderr, flush=True)
        last[0] = time.perf_counter()
    write(DETAIL_HEAD, file=stream)
    results: List[Result] = []
    t0 = time.perf_counter()
    try:
        for i, case in enumerate(todo):
            if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
                results.append(Result(case.op, case.label, "(skipped)", "ours", None,
                                      error=f"skipped: the {max_seconds:.0f} s time budget was spent"))
                write(format_row(results[-1]), file=stream)
                continue
            done = [0.0]
            base = float(len(results and {(x.op, x.case) for x in results}))

            def on_sample(name, r, total, case=case, base=base):
                if bar is not None:  # fractions of a case: the ETA moves with every sample
                    done[0] = min(0.999, done[0] + 1.0 / total)
                    bar.n = base + done[0]
                    bar.set_postfix_str(f"{case.label[:34]} | {name[:22]} | round {r + 1}")
                elif plain and time.perf_counter() - last[0] >= HEARTBEAT_S:
                    say(f"  ... {case.op} {case.label[:34]} | {name[:22]} | round {r + 1} "
                        f"({time.perf_counter() - t0:.0f} s elapsed)")
            if plain:
                say(f"[{i + 1}/{len(todo)}] {case.op}: {case.label}")
            if bar is not None:
                bar.set_description_str(case.op)
                bar.set_postfix_str(f"{case.label[:34]} | building")
            rows = measure_case(case, device, rounds, min_sample_ms, on_sample)
            results += rows
            if bar is not None:
                bar.n = float(len({(x.op, x.case) for x in results}))
                bar.refresh()
            for r in rows:
                write(format_row(r), file=stream)
            if json_path:
                write_json(json_path, head, results)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        if bar is not None:
            bar.close()
    cross_check(results)
    if json_path:
        write_json(json_path, head, results)
    return results
