"""Results, ratios, the verdict and details tables, JSON and the PNG plot.

Every ratio reads one way, higher is better:

* ``× faster than sorsa 1.0.1`` = time(sorsa 1.0.1) / time(row), per round, median over rounds;
* ``× faster than PEFT LoRA`` = time(PEFT's ``lora.Linear``, same shapes and dropout) / time(row);
* ``× floor speed`` = time(floor) / time(row): 1.0 means the row runs at the floor (the work it
  cannot avoid), 0.5 means it takes twice the floor's time. A value above 1 is impossible and
  flagged as noise.

The spread is the interquartile range of the per-round ratios relative to their median; a row
whose spread exceeds ``NOISY`` is marked ``~`` (too noisy to call). A row whose ratios drift
(the medians of the first and second half of the rounds differ by more than the spread, and
by more than ``DRIFT``) is marked ``≈``: the machine's load changed during the run.
"""
from __future__ import annotations

import json
import math
import os
import textwrap
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from .cases import modules, op_texts
from .timing import quartiles

NOISY = 0.25
DRIFT = 0.05
#: the comparisons of a row, each ``time(role's row) / time(row)``: field -> (role, column title)
VERSUS = {"vs_ref": ("ref", "× faster than sorsa 1.0.1"), "vs_peft": ("peft", "× faster than PEFT LoRA"),
          "vs_floor": ("floor", "× floor speed")}

LEGEND = textwrap.fill(
    "Legend: '× faster than sorsa 1.0.1' / '× faster than PEFT LoRA' = its time ÷ this row's time (higher is "
    "better, > 1: faster than it); '× floor speed' = the floor's time ÷ this row's time (1.00 = at the floor, "
    "> 1 is impossible); IQR = interquartile range of the per-round ratios ÷ their median; "
    f"'~' = IQR > {NOISY:.0%} (too noisy to call); '≈' = the ratio drifted during the run (load changed: "
    "rerun on a quiet machine); '!' = impossible result (noise, not a finding).", 100)


@dataclass
class Result:
    """One implementation of one case. ``vs_ref`` / ``vs_floor``: (median, q1, q3) of the
    per-round ratios (see the module doc), None where the case has no such row."""
    op: str
    case: str
    impl: str
    role: str
    ms: Optional[float]
    ms_q1: Optional[float] = None
    ms_q3: Optional[float] = None
    rounds: int = 0
    vs_ref: Optional[Tuple[float, float, float]] = None
    vs_floor: Optional[Tuple[float, float, float]] = None
    vs_peft: Optional[Tuple[float, float, float]] = None
    flags: List[str] = field(default_factory=list)
    extra: Dict[str, object] = field(default_factory=dict)
    error: Optional[str] = None

    @property
    def spread(self) -> float:
        """Largest relative IQR of this row's ratios (0 when it has none)."""
        out = 0.0
        for t in (self.vs_ref, self.vs_floor, self.vs_peft):
            if t and t[0] > 0:
                out = max(out, (t[2] - t[1]) / t[0])
        return out


def _ratio(num: Sequence[float], den: Sequence[float]) -> Tuple[float, float, float]:
    q1, med, q3 = quartiles([a / b for a, b in zip(num, den)])
    return med, q1, q3


def drifted(ratios: Sequence[float]) -> bool:
    """Whether per-round ``ratios`` drift: the medians of their first and second half differ by
    more than the halves' own spread (relative IQR) and more than :data:`DRIFT`. The overall IQR
    cannot show this: two steady halves at different levels widen it and look merely noisy."""
    n = len(ratios)
    if n < 4:
        return False
    halves = [quartiles(list(ratios[:n // 2])), quartiles(list(ratios[n - n // 2:]))]
    if min(h[1] for h in halves) <= 0:
        return False
    spread = max((h[2] - h[0]) / h[1] for h in halves)
    a, b = halves[0][1], halves[1][1]
    return abs(a - b) / min(a, b) > max(DRIFT, spread)


def results_for_case(op: str, case: str, roles: Dict[str, str], samples: Dict[str, List[float]],
                     extra: Dict[str, dict], errors: Dict[str, str]) -> List[Result]:
    """Rows of one case from its per-round samples (see timing.time_interleaved)."""
    samples = dict(samples)
    extra = {n: dict(e) for n, e in extra.items()}
    for name, ex in extra.items():  # a time computed by the runner (e.g. an extrapolation)
        if "ms_override" in ex and name not in samples:
            samples[name] = [ex.pop("ms_override")]
    against = {key: next((n for n, r in roles.items() if r == role and n in samples), None)
               for key, (role, _) in VERSUS.items()}
    out = []
    for name, role in roles.items():
        ex = extra.get(name, {})
        if name not in samples:
            out.append(Result(op, case, name, role, None, error=errors.get(name, "not run"), extra=ex))
            continue
        s = samples[name]
        q1, med, q3 = quartiles(s)
        rr = Result(op, case, name, role, med, q1, q3, len(s), extra=ex)
        drift = False
        for key, other in against.items():
            if other is None:
                continue
            den = samples[other]
            if len(den) == len(s):
                setattr(rr, key, _ratio(den, s))
                drift |= name != other and drifted([a / b for a, b in zip(den, s)])
            else:  # a single-shot row: ratio of medians
                m = quartiles(den)[1] / med
                setattr(rr, key, (m, m, m))
        if rr.vs_floor and role != "floor" and rr.vs_floor[1] > 1.0:
            rr.flags.append("! faster than the floor (noise)")
        if rr.spread > NOISY:
            rr.flags.append("~ noisy")
        if drift:
            rr.flags.append("≈ drifted")
        out.append(rr)
    return out


def cross_check(results: List[Result]) -> None:
    """Flag impossible results across cases (each op's bench module says what is impossible)."""
    for m in modules():
        if hasattr(m, "cross_check"):
            m.cross_check(results)


def _fmt_ratio(t) -> str:
    if not t:
        return "-"
    med, q1, q3 = t
    iqr = (q3 - q1) / med if med > 0 else 0.0
    return f"{med:.2f}× (IQR {100 * iqr:.0f}%)"


DETAIL_HEAD = (f"{'op':<14} {'case':<40} {'implementation':<46} {'ms/call':>9} {'× faster than sorsa 1.0.1':>26} "
               f"{'× faster than PEFT LoRA':>24} {'× floor speed':>18}  notes")


def format_row(r: Result) -> str:
    """One details row (fixed-width columns, headed by DETAIL_HEAD)."""
    if r.ms is None:
        return f"{r.op:<14} {r.case:<40} {r.impl:<46} {'error':>9}  {r.error}"
    notes = list(r.flags)
    for k, fmt in (("auto", "auto→{}"), ("sigma_err", "max σ err {:.2%}"), ("host_ms", "host {:.3f} ms"),
                   ("matrices", "{} matrices"), ("groups", "per group: {}")):
        if k in r.extra:
            notes.append(fmt.format(r.extra[k]))
    return (f"{r.op:<14} {r.case:<40} {r.impl:<46} {r.ms:>9.3f} {_fmt_ratio(r.vs_ref):>26} "
            f"{_fmt_ratio(r.vs_peft):>24} {_fmt_ratio(r.vs_floor):>18}  {'; '.join(notes)}")


def details_table(results: List[Result]) -> str:
    lines = [DETAIL_HEAD, "-" * len(DETAIL_HEAD)]
    return "\n".join(lines + [format_row(r) for r in results])




def _geo(xs):
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def verdict_table(results: List[Result]) -> str:
    """One line per op over its cases, using the primary ``ours`` row of each case: geometric
    mean (and range) of the ratios, the largest spread, and what ``auto`` ran."""
    head = (f"{'op':<18} {'cases':>5}  {'× faster than sorsa 1.0.1 (range)':<34} "
            f"{'× faster than PEFT LoRA (range)':<32} {'× floor speed (range)':<24} {'worst IQR':>9}  "
            f"{'ours ran':<10} notes")
    lines = [head, "-" * len(head)]
    texts = op_texts()
    for op in texts:
        rows = [r for r in results if r.op == op and r.role == "ours"]
        if not rows:
            continue
        ok = [r for r in rows if r.ms]
        cols = []
        for key in VERSUS:
            v = [getattr(r, key)[0] for r in ok if getattr(r, key)]
            cols.append(f"{_geo(v):.2f}× ({min(v):.2f}–{max(v):.2f})" if v else "-")
        spread = max((r.spread for r in ok), default=0.0)
        ran = sorted({str(r.extra.get("auto", r.impl.split("[")[-1].rstrip("]"))) for r in ok})
        notes = []
        if len(ok) < len(rows):
            notes.append(f"{len(rows) - len(ok)} case(s) failed")
        if any(f.startswith("!") for r in ok for f in r.flags):
            notes.append("some rows flagged as noise (see details)")
        if spread > NOISY:
            notes.append("~ too noisy to call")
        if any(f.startswith("≈") for r in ok for f in r.flags):
            notes.append("≈ drifted: rerun on a quiet machine")
        errs = [r.extra["sigma_err"] for r in ok if "sigma_err" in r.extra]
        if errs:
            notes.append(f"max σ err {max(errs):.2%}")
        lines.append(f"{texts[op]:<18} {len(rows):>5}  {cols[0]:<34} {cols[1]:<32} {cols[2]:<24} {100 * spread:>8.0f}%  "
                     f"{','.join(ran)[:10]:<10} {'; '.join(notes)}")
    return "\n".join(lines)


def busy_warning(results: List[Result]) -> Optional[str]:
    """One line for the top of the verdict when most of our rows are too noisy (or drifted) to
    call: their numbers then say more about the machine's load than about the code."""
    ours = [r for r in results if r.role == "ours" and r.ms]
    bad = [r for r in ours if any(f[:1] in "~≈" for f in r.flags)]
    if ours and len(bad) * 2 > len(ours):
        return (f"INCONCLUSIVE: {len(bad)} of {len(ours)} of our rows are too noisy or drifted (the machine was "
                f"busy); the ratios below are not findings. Rerun on a quiet machine.")
    return None


def to_json(results: List[Result]) -> List[dict]:
    return [asdict(r) for r in results]


def from_json(rows: List[dict]) -> List[Result]:
    return [Result(**{k: (tuple(v) if k in VERSUS and v else v) for k, v in d.items()})
            for d in rows]


def write_json(path: str, header: dict, results: List[Result]) -> None:
    """Write (atomically: a temp file renamed) the header and every result so far."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"header": header, "results": to_json(results)}, f, indent=1)
    os.replace(tmp, path)


def plot(results: List[Result], path: str) -> Optional[str]:
    """PNG: per op, our speed-up over sorsa 1.0.1 and our fraction of the floor's speed per case,
    with interquartile error bars. Returns the path, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    texts = op_texts()
    ops = [op for op in texts if any(r.op == op and r.role == "ours" and r.ms for r in results)]
    if not ops:
        return None
    fig, axes = plt.subplots(1, len(ops), figsize=(4.2 * len(ops), 4.8), squeeze=False)
    for ax, op in zip(axes[0], ops):
        rows = [r for r in results if r.op == op and r.role == "ours" and r.ms]
        xs = range(len(rows))
        for off, key, color, lab in ((-0.2, "vs_ref", "tab:blue", "× faster than sorsa 1.0.1"),
                                     (0.2, "vs_floor", "tab:gray", "× floor speed (1 = at the floor)")):
            vals = [getattr(r, key) or (float("nan"),) * 3 for r in rows]
            med = [v[0] for v in vals]
            err = [[max(0.0, v[0] - v[1]) for v in vals], [max(0.0, v[2] - v[0]) for v in vals]]
            ax.bar([x + off for x in xs], med, width=0.4, yerr=err, capsize=3, color=color, label=lab)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(list(xs), [r.case.replace(" ", "\n", 2) for r in rows], fontsize=6)
        ax.set_title(texts[op])
        ax.set_ylabel("ratio (higher is better); bars: IQR")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
