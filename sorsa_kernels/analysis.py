"""The SORSA paper's analysis of fine-tuning: how far each weight's singular values and singular
vectors moved, for any fine-tuning method.

For a weight with pre-trained SVD ``W₀ = U₀Σ₀V₀ᵀ`` and tuned SVD ``W_t = U_tΣ_tV_tᵀ``:

* ``ΔΣ = mean_i |σ_t,i − σ₀,i|`` over all ``min(m, n)`` singular values;
* ``ΔD = 1 − mean_i (|u_t,i·u₀,i| + |v_t,i·v₀,i|) / 2`` over the singular-vector pairs, matched by
  index (absolute values: a singular pair is defined only up to a common sign).

Where singular values are (nearly) equal, the singular vectors are defined only up to a rotation
within their subspace and ΔD of those indices depends on the SVD routine; the result is still
reproducible (the same routine on the same device gives the same vectors), and ``ΔΣ`` is
unaffected. Weights of any float dtype are analysed in float32 (the SVD's error, ~1e-6 relative,
is far below the shifts fine-tuning makes; the tests hold the float32 numbers to 1e-4 absolute on
ΔD and 1e-3 relative on ΔΣ against float64).

A source (base or tuned) may be a module — SORSA layers (ours or sorsa 1.0.1's) and PEFT LoRA /
PiSSA / KaSA / OLoRA layers are read as the weight they compute with, without changing the
model —, a state dict, a ``.safetensors`` file, or a folder of them (sharded Hugging Face
checkpoints). Weights are named as in the original, unadapted model
(``model.layers.0.self_attn.q_proj.weight``): PEFT's ``base_model.model.`` prefix and
``.base_layer`` are dropped.
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

Source = Union[nn.Module, Dict[str, torch.Tensor], str]
Shift = Tuple[float, float]
CHUNK_BYTES = 1 << 30  # float32 bytes of weights decomposed at once (a 7B model's 224 matrices never all at once)


# ----------------------------------------------------------------------------- reading weights
def _clean(name: str) -> str:
    """The name a weight has in the original, unadapted model."""
    name = re.sub(r"^base_model\.model\.", "", name)
    return name.replace(".base_layer.", ".")


def _module_weights(model: nn.Module) -> Dict[str, Callable[[], torch.Tensor]]:
    """name -> thunk giving the weight the module computes with (stored orientation)."""
    from .layer import SORSALinear
    out: Dict[str, Callable[[], torch.Tensor]] = {}
    covered = set()
    for mname, mod in model.named_modules():
        prefix = f"{mname}." if mname else ""
        if isinstance(mod, SORSALinear):
            out[_clean(prefix + "weight")] = (lambda m=mod: m.effective_weight().T if m.fan_in_fan_out
                                              else m.effective_weight())
            covered.update(prefix + p for p in ("weight", "sorsa_A", "sorsa_S", "sorsa_B"))
        elif all(hasattr(mod, a) for a in ("sorsa_A", "sorsa_S", "sorsa_B", "weight")) and hasattr(mod, "scale"):
            # sorsa 1.0.1's layer: weight is W_r while unmerged
            def ref(m=mod):
                w = m.weight.detach().float()
                if getattr(m, "merged", False):
                    return w
                return w + m.scale * (m.sorsa_B.float() * m.sorsa_S.float()) @ m.sorsa_A.float()
            out[_clean(prefix + "weight")] = ref
            covered.update(prefix + p for p in ("weight", "sorsa_A", "sorsa_S", "sorsa_B"))
        elif hasattr(mod, "get_base_layer") and hasattr(mod, "lora_A") and hasattr(mod, "get_delta_weight"):
            def peft(m=mod):  # PEFT LoRA family: base weight + the active adapters' delta, unmerged
                w = m.get_base_layer().weight.detach().float()
                if not getattr(m, "merged", False) and not getattr(m, "disable_adapters", False):
                    for a in m.active_adapters:
                        if a in m.lora_A:
                            w = w + m.get_delta_weight(a).float()
                return w
            out[_clean(prefix + "weight")] = peft
            covered.update(n for n, _ in mod.named_parameters(prefix=mname))
    for pname, p in model.named_parameters():
        if pname in covered or p.dim() != 2 or "lora_" in pname:
            continue
        out.setdefault(_clean(pname), lambda p=p: p.detach())
    return out


def _file_weights(path: str) -> Dict[str, Callable[[], torch.Tensor]]:
    files = sorted(glob.glob(os.path.join(path, "*.safetensors"))) if os.path.isdir(path) else [path]
    if os.path.isdir(path) and not files:
        files = sorted(glob.glob(os.path.join(path, "*.bin")) + glob.glob(os.path.join(path, "*.pt")))
    if not files:
        raise FileNotFoundError(f"no .safetensors, .bin or .pt weights in {path!r}")
    out: Dict[str, Callable[[], torch.Tensor]] = {}
    for f in files:
        if f.endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(f, framework="pt") as fh:
                for k in fh.keys():
                    if len(fh.get_slice(k).get_shape()) == 2:
                        out[_clean(k)] = (lambda f=f, k=k: _load_one(f, k))
        else:
            sd = torch.load(f, map_location="cpu", weights_only=True)
            out.update(_dict_weights(sd))
    return out


def _load_one(f: str, k: str) -> torch.Tensor:
    from safetensors import safe_open
    with safe_open(f, framework="pt") as fh:
        return fh.get_tensor(k)


def _dict_weights(sd: Dict[str, torch.Tensor]) -> Dict[str, Callable[[], torch.Tensor]]:
    return {_clean(k): (lambda v=v: v) for k, v in sd.items() if isinstance(v, torch.Tensor) and v.dim() == 2}


def weights_of(source: Source) -> Dict[str, Callable[[], torch.Tensor]]:
    """name -> thunk returning that 2-D weight (loaded or computed only when called)."""
    if isinstance(source, nn.Module):
        return _module_weights(source)
    if isinstance(source, dict):
        return _dict_weights(source)
    if isinstance(source, (str, os.PathLike)):
        return _file_weights(os.fspath(source))
    raise TypeError(f"a source must be an nn.Module, a state dict, a .safetensors file or a folder, "
                    f"got {type(source).__name__}")


def _select(names: Iterable[str], pattern) -> List[str]:
    if pattern is None:
        return sorted(names)
    if isinstance(pattern, str):
        rx = re.compile(pattern)
        return sorted(n for n in names if rx.search(n))
    pats = list(pattern)
    return sorted(n for n in names if any(p in n for p in pats))


# ----------------------------------------------------------------------------- the two formulas
def shift_of(U0: torch.Tensor, S0: torch.Tensor, V0: torch.Tensor, U: torch.Tensor, S: torch.Tensor,
             V: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(ΔΣ, ΔD) per matrix of a batch of thin SVDs (``U (b, m, k)``, ``S (b, k)``, ``V (b, n, k)``)."""
    d_sigma = (S - S0).abs().mean(-1)
    cos_u = (U * U0).sum(-2).abs()
    cos_v = (V * V0).sum(-2).abs()
    d_d = 1.0 - ((cos_u + cos_v) / 2).mean(-1)
    return d_sigma, d_d


def spectral_shift_naive(W0: torch.Tensor, W: torch.Tensor) -> Shift:
    """The formulas in float64, one matrix at a time (the reference of the tests)."""
    U0, S0, V0h = torch.linalg.svd(W0.double(), full_matrices=False)
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    ds, dd = shift_of(U0[None], S0[None], V0h.mT[None], U[None], S[None], Vh.mT[None])
    return float(ds), float(dd)


def _svd(W: torch.Tensor):
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U, S, Vh.mT


# ----------------------------------------------------------------------------- the API
def _fingerprint(names: Sequence[str], W: torch.Tensor) -> str:
    """Names, shape and bytes of a chunk of base weights: the key of its cached SVD."""
    import hashlib
    h = hashlib.sha256()
    h.update(repr((list(names), tuple(W.shape), str(W.dtype))).encode())
    h.update(W.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def _base_svd(names: Sequence[str], W0: torch.Tensor, target: torch.device, cache_dir: Optional[str]):
    """The base chunk's thin SVD, read from / written to ``cache_dir`` when given."""
    path = None
    if cache_dir:
        path = os.path.join(cache_dir, f"spectral-base-{_fingerprint(names, W0)}.safetensors")
        if os.path.exists(path):
            from safetensors.torch import load_file
            f = load_file(path)
            return f["U"].to(target), f["S"].to(target), f["V"].to(target)
    U0, S0, V0 = _svd(W0.to(target, torch.float32))
    if path:
        from safetensors.torch import save_file
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        save_file({"U": U0.contiguous().cpu(), "S": S0.contiguous().cpu(), "V": V0.contiguous().cpu()}, tmp)
        os.replace(tmp, path)
    return U0, S0, V0


def spectral_shift(base: Source, tuned: Union[Source, Sequence[Source]], *, names=None,
                   device: Union[str, torch.device, None] = None, chunk_bytes: int = CHUNK_BYTES,
                   cache_dir: Optional[str] = None) -> Union[Dict[str, Shift], List[Dict[str, Shift]]]:
    """ΔΣ and ΔD of every 2-D weight of ``tuned`` against ``base`` (see the module docstring).

    Args:
        base: the pre-trained weights: a module, a state dict, a ``.safetensors`` file or a folder.
        tuned: the same kinds, or a list of them (checkpoints): then a list of results in that
            order, the base decomposed once.
        names: only these weights: substrings (a list) or a regular expression (a str).
        device: where the SVDs run (default: where the base's first weight lives; a GPU batches
            them there).
        chunk_bytes: float32 bytes of base weights decomposed at once (memory bound).
        cache_dir: keep the base's SVD here between calls (one file per chunk, keyed by a
            fingerprint of the names and weight bytes: a changed base is decomposed again).

    Returns:
        ``{name: (delta_sigma, delta_d)}`` (a list of them for a list of ``tuned``). Raises
        ``ValueError`` listing the weights missing on one side or of a different shape.
    """
    many = isinstance(tuned, (list, tuple))
    tuned_list = list(tuned) if many else [tuned]
    if not tuned_list:
        raise ValueError("tuned must be a source or a non-empty list of sources")
    b = weights_of(base)
    ts = [weights_of(t) for t in tuned_list]
    sel = _select(b, names)
    if not sel:
        raise ValueError(f"no 2-D weight of the base matches names={names!r}")
    problems = []
    for i, t in enumerate(ts):
        tag = f"tuned[{i}]" if many else "tuned"
        missing = [n for n in sel if n not in t]
        extra = [n for n in _select(t, names) if n not in b]
        if missing:
            problems.append(f"{tag} lacks {len(missing)} weight(s) of the base: {missing[:8]}")
        if extra:
            problems.append(f"{tag} has {len(extra)} weight(s) the base lacks: {extra[:8]}")
    if problems:
        raise ValueError("spectral_shift: the models do not match:\n  - " + "\n  - ".join(problems))
    shapes = {n: tuple(b[n]().shape) for n in sel}
    dev = torch.device(device) if device is not None else None
    results: List[Dict[str, Shift]] = [{} for _ in ts]
    groups: Dict[tuple, List[str]] = {}
    for n in sel:
        groups.setdefault(shapes[n], []).append(n)
    for shape, group in groups.items():
        step = max(1, chunk_bytes // (4 * shape[0] * shape[1]))
        for s in range(0, len(group), step):
            chunk = group[s:s + step]
            W0 = torch.stack([b[n]().detach() for n in chunk])
            target = dev or (W0.device if W0.device.type != "meta" else torch.device("cpu"))
            if W0.device.type == "meta":
                raise ValueError(f"spectral_shift: base weight {chunk[0]} is on the meta device (no values)")
            U0, S0, V0 = _base_svd(chunk, W0, target, cache_dir)
            del W0
            for i, t in enumerate(ts):
                mats = []
                for n in chunk:
                    w = t[n]().detach()
                    if tuple(w.shape) != shape:
                        if tuple(w.shape) == shape[::-1]:  # stored the other way round (Conv1D)
                            w = w.T
                        else:
                            raise ValueError(f"spectral_shift: {n} has shape {tuple(w.shape)} in the tuned model, "
                                             f"{shape} in the base")
                    if w.device.type == "meta":
                        raise ValueError(f"spectral_shift: tuned weight {n} is on the meta device (no values)")
                    mats.append(w.to(target, torch.float32))
                U, S, V = _svd(torch.stack(mats))
                ds, dd = shift_of(U0, S0, V0, U, S, V)
                for n, a, c in zip(chunk, ds.tolist(), dd.tolist()):
                    results[i][n] = (a, c)
    return results if many else results[0]


def mean_shift(result: Dict[str, Shift]) -> Shift:
    """The mean over layers of a :func:`spectral_shift` result (the paper's thick path)."""
    vals = list(result.values())
    return (sum(v[0] for v in vals) / len(vals), sum(v[1] for v in vals) / len(vals))


# ----------------------------------------------------------------------------- tracking and output
class SpectralTracker:
    """Record ΔΣ and ΔD of a model during training, without saving checkpoints::

        tracker = sk.SpectralTracker(model, names=["q_proj", "v_proj"])   # base = the model now
        ...; tracker.record(step)
        tracker.write("shift.json", plot="shift.png")

    ``base`` (default: the model's weights at construction, copied to the CPU) is any source
    :func:`spectral_shift` takes."""

    def __init__(self, model: nn.Module, base: Optional[Source] = None, *, names=None,
                 device: Union[str, torch.device, None] = None):
        self.model, self.names, self.device = model, names, device
        if base is None:
            w = weights_of(model)
            base = {n: w[n]().detach().float().cpu().clone() for n in _select(w, names)}
        self.base = base
        self.steps: List[int] = []
        self.results: List[Dict[str, Shift]] = []

    @torch.no_grad()
    def record(self, step: int) -> Dict[str, Shift]:
        """ΔΣ, ΔD of every selected weight now; kept with ``step``."""
        r = spectral_shift(self.base, self.model, names=self.names, device=self.device)
        self.steps.append(int(step))
        self.results.append(r)
        return r

    def to_json(self) -> dict:
        return trajectory_json("model", [f"step {s}" for s in self.steps], self.results)

    def write(self, path: str, plot: Optional[str] = None) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=1)
        if plot:
            plot_shift([self.to_json()], plot)


def trajectory_json(base: str, labels: Sequence[str], results: Sequence[Dict[str, Shift]]) -> dict:
    """The JSON of ``sorsa-kernels analyze``: per checkpoint, per layer and the mean."""
    cps = []
    for label, r in zip(labels, results):
        ms, md = mean_shift(r)
        cps.append({"path": label, "layers": {n: {"delta_sigma": a, "delta_d": c} for n, (a, c) in r.items()},
                    "mean": {"delta_sigma": ms, "delta_d": md}})
    return {"base": base, "checkpoints": cps}


def plot_shift(runs: Sequence[dict], path: str, titles: Optional[Sequence[str]] = None) -> str:
    """The paper's figure: one panel per run (a :func:`trajectory_json` dict), every layer a point
    (ΔΣ, ΔD) per checkpoint coloured by order, the mean as a thick path from the origin."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 4), squeeze=False)
    for k, (ax, run) in enumerate(zip(axes[0], runs)):
        cps = run["checkpoints"]
        cmap = plt.get_cmap("viridis")
        for i, cp in enumerate(cps):
            xs = [v["delta_sigma"] for v in cp["layers"].values()]
            ys = [v["delta_d"] for v in cp["layers"].values()]
            ax.scatter(xs, ys, s=6, color=cmap(i / max(1, len(cps) - 1)), alpha=0.6, label=cp["path"])
        path_x = [0.0] + [cp["mean"]["delta_sigma"] for cp in cps]
        path_y = [0.0] + [cp["mean"]["delta_d"] for cp in cps]
        ax.plot(path_x, path_y, color="black", linewidth=2.5, label="mean")
        ax.set_xlabel("ΔΣ")
        ax.set_ylabel("ΔD")
        ax.set_title(titles[k] if titles else run["base"])
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def SpectralShiftCallback(every: int, *, names=None, base: Optional[Source] = None, json_path: Optional[str] = None,
                          plot: Optional[str] = None, device: Union[str, torch.device, None] = None):
    """A ``transformers.TrainerCallback`` recording ΔΣ/ΔD every ``every`` steps (and at the end):
    the mean goes to the Trainer's logs (``spectral_delta_sigma``, ``spectral_delta_d``), the
    trajectory to ``callback.tracker`` and, at the end of training, to ``json_path`` / ``plot``."""
    from transformers import TrainerCallback
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be an int >= 1, got {every!r}")

    class _Callback(TrainerCallback):
        def __init__(self):
            self.tracker: Optional[SpectralTracker] = None

        def on_train_begin(self, args, state, control, model=None, **kw):
            self.tracker = SpectralTracker(model, base=base, names=names, device=device)

        def _record(self, state):
            r = self.tracker.record(state.global_step)
            ms, md = mean_shift(r)
            state.log_history.append({"step": state.global_step, "spectral_delta_sigma": ms, "spectral_delta_d": md})

        def on_step_end(self, args, state, control, **kw):
            if self.tracker is not None and state.global_step % every == 0:
                self._record(state)
            return control

        def on_train_end(self, args, state, control, **kw):
            if self.tracker is None:
                return control
            if not self.tracker.steps or self.tracker.steps[-1] != state.global_step:
                self._record(state)
            if json_path or plot:
                if json_path:
                    self.tracker.write(json_path, plot=plot)
                else:
                    plot_shift([self.tracker.to_json()], plot)
            return control

    return _Callback()
