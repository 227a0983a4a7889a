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
class _Weight:
    """One 2-D weight of a source: its shape (known without loading it) and a loader."""
    __slots__ = ("shape", "load")

    def __init__(self, shape: Tuple[int, ...], load: Callable[[], torch.Tensor]):
        self.shape, self.load = tuple(shape), load


def _clean(name: str) -> str:
    """The name a weight has in the original, unadapted model."""
    name = re.sub(r"^base_model\.model\.", "", name)
    return name.replace(".base_layer.", ".")


_ADAPTER_KEYS = ("sorsa_A", "sorsa_S", "sorsa_B", "lora_A", "lora_B", "lora_embedding_A", "lora_magnitude_vector")


def _refuse_adapter_files(keys: Iterable[str], where: str) -> None:
    """Adapter checkpoints hold factors, not the weights the model computes with: say how to read them."""
    found = sorted({k for k in keys for a in _ADAPTER_KEYS if f".{a}" in k or k.startswith(a)})
    if found:
        raise ValueError(
            f"spectral_shift: {where} holds adapter factors ({found[0]}, ...), not merged weights: load it "
            "into its model (sk.load_adapter for SORSA, peft.PeftModel.from_pretrained for PEFT) and pass the "
            "model, or merge first (sk.merge_and_unload / merge_and_unload()) and save the merged weights")


def _peft_weight(m: nn.Module) -> torch.Tensor:
    """A PEFT LoRA-family linear layer's weight as computed: base + each active adapter, through the
    adapter's variant where it has one (KaSA's diag, DoRA's magnitude: get_delta_weight omits them)."""
    w = m.get_base_layer().weight.detach().float()
    if getattr(m, "merged", False) or getattr(m, "disable_adapters", False):
        return w
    variants = getattr(m, "lora_variant", {}) or {}
    for a in m.active_adapters:
        if a not in m.lora_A:
            continue
        v = variants.get(a)
        if v is not None:
            w = v.merge_safe(m, a, w.clone()).float()
        else:
            w = w + m.get_delta_weight(a).float()
    return w


def _module_weights(model: nn.Module) -> Dict[str, _Weight]:
    """name -> the weight the module computes with (stored orientation)."""
    from .layer import SORSALinear
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # peft is optional
        BaseTunerLayer = ()
    out: Dict[str, _Weight] = {}
    covered = set()
    for mname, mod in model.named_modules():
        prefix = f"{mname}." if mname else ""
        if isinstance(mod, SORSALinear):
            out[_clean(prefix + "weight")] = _Weight(
                mod.weight.shape, lambda m=mod: m.effective_weight().T if m.fan_in_fan_out else m.effective_weight())
            covered.update(prefix + p for p in ("weight", "sorsa_A", "sorsa_S", "sorsa_B"))
        elif all(hasattr(mod, a) for a in ("sorsa_A", "sorsa_S", "sorsa_B", "weight")) and hasattr(mod, "scale"):
            def ref(m=mod):  # sorsa 1.0.1's layer: weight is W_r while unmerged
                w = m.weight.detach().float()
                if getattr(m, "merged", False):
                    return w
                return w + m.scale * (m.sorsa_B.float() * m.sorsa_S.float()) @ m.sorsa_A.float()
            out[_clean(prefix + "weight")] = _Weight(mod.weight.shape, ref)
            covered.update(prefix + p for p in ("weight", "sorsa_A", "sorsa_S", "sorsa_B"))
        elif BaseTunerLayer and isinstance(mod, BaseTunerLayer):
            base = mod.get_base_layer() if hasattr(mod, "get_base_layer") else None
            w = getattr(base, "weight", None)
            linear_lora = (hasattr(mod, "lora_A") and len(getattr(mod, "lora_A", {})) > 0 and w is not None
                           and w.dim() == 2 and not getattr(mod, "lora_embedding_A", None))
            if not linear_lora:
                raise ValueError(
                    f"spectral_shift: {mname} is a PEFT {type(mod).__module__}.{type(mod).__name__} layer; only "
                    "LoRA-family linear layers (LoRA, PiSSA, OLoRA, KaSA, DoRA) are read as the weight they compute "
                    "with: call merge_and_unload() on the model first, or leave it out with names=")
            out[_clean(prefix + "weight")] = _Weight(w.shape, lambda m=mod: _peft_weight(m))
            covered.update(n for n, _ in mod.named_parameters(prefix=mname))
    for pname, p in model.named_parameters():
        if pname in covered or p.dim() != 2 or not p.is_floating_point():
            continue
        out.setdefault(_clean(pname), _Weight(p.shape, lambda p=p: p.detach()))
    return out


_NOT_WEIGHTS = ("optimizer", "scheduler", "training_args", "rng_state", "trainer_state", "scaler")


def _file_weights(path: str) -> Dict[str, _Weight]:
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:  # a .bin checkpoint folder: the model's shards only
            files = sorted(f for f in glob.glob(os.path.join(path, "*.bin")) + glob.glob(os.path.join(path, "*.pt"))
                           if not os.path.basename(f).startswith(_NOT_WEIGHTS))
    else:
        files = [path]
    if not files or not all(os.path.exists(f) for f in files):
        raise FileNotFoundError(f"spectral_shift: no .safetensors, .bin or .pt weights at {path!r}")
    out: Dict[str, _Weight] = {}
    for f in files:
        if f.endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(f, framework="pt") as fh:
                keys = list(fh.keys())
                _refuse_adapter_files(keys, f)
                for k in keys:
                    sl = fh.get_slice(k)
                    if len(sl.get_shape()) == 2 and sl.get_dtype().startswith(("F", "BF")):
                        out[_clean(k)] = _Weight(sl.get_shape(), (lambda f=f, k=k: _load_one(f, k)))
        else:
            out.update(_dict_weights(torch.load(f, map_location="cpu", weights_only=True), f))
    return out


def _load_one(f: str, k: str) -> torch.Tensor:
    from safetensors import safe_open
    with safe_open(f, framework="pt") as fh:
        return fh.get_tensor(k)


def _dict_weights(sd: Dict[str, torch.Tensor], where: str = "the state dict") -> Dict[str, _Weight]:
    _refuse_adapter_files(sd.keys(), where)
    return {_clean(k): _Weight(v.shape, lambda v=v: v) for k, v in sd.items()
            if isinstance(v, torch.Tensor) and v.dim() == 2 and v.is_floating_point()}


def weights_of(source: Source) -> Dict[str, _Weight]:
    """name -> the source's 2-D floating weights (shape known; values loaded or computed when asked)."""
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


def _values(w: torch.Tensor, name: str, side: str) -> torch.Tensor:
    if w.device.type == "meta":
        raise ValueError(f"spectral_shift: {side} weight {name} is on the meta device (it has no values)")
    return w.detach().float()


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
    problems = []
    shapes = {n: b[n].shape for n in sel}
    for i, t in enumerate(ts):
        tag = f"tuned[{i}]" if many else "tuned"
        bad = [f"{n}: {t[n].shape} in {tag}, {shapes[n]} in the base" for n in sel
               if t[n].shape not in (shapes[n], shapes[n][::-1])]
        if bad:
            problems.append(f"{tag}: {len(bad)} weight(s) of another shape: " + "; ".join(bad[:8]))
    if problems:
        raise ValueError("spectral_shift: the models do not match:\n  - " + "\n  - ".join(problems))
    dev = torch.device(device) if device is not None else None
    results: List[Dict[str, Shift]] = [{} for _ in ts]
    groups: Dict[tuple, List[str]] = {}
    for n in sel:
        groups.setdefault(shapes[n], []).append(n)
    for shape, group in groups.items():
        step = max(1, chunk_bytes // (4 * shape[0] * shape[1]))
        for s in range(0, len(group), step):
            chunk = group[s:s + step]
            loads = [_values(b[n].load(), n, "base") for n in chunk]
            target = dev or loads[0].device
            W0 = torch.stack([w.to(target) for w in loads])
            del loads
            U0, S0, V0 = _base_svd(chunk, W0, target, cache_dir)
            del W0
            for i, t in enumerate(ts):
                # a weight stored the other way round (GPT-2's Conv1D in one model, Linear in the
                # other) is compared in the base's orientation; a square one cannot be told apart
                W = torch.stack([_values(w if w.shape == shape else w.T, n, "tuned").to(target, torch.float32)
                                 for n in chunk for w in (t[n].load(),)])
                U, S, V = _svd(W)
                del W
                ds, dd = shift_of(U0, S0, V0, U, S, V)
                del U, S, V
                for n, a, c in zip(chunk, ds.tolist(), dd.tolist()):
                    results[i][n] = (a, c)
            del U0, S0, V0
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

    ``base`` (default: the model's weights at construction, copied to the CPU in float32: for a
    large model pass ``names=`` or a base on disk) is any source :func:`spectral_shift` takes.
    ``cache_dir`` keeps the base's SVD on disk, so each record decomposes only the model."""

    def __init__(self, model: nn.Module, base: Optional[Source] = None, *, names=None,
                 device: Union[str, torch.device, None] = None, cache_dir: Optional[str] = None):
        first = next(model.parameters(), None)
        self.model, self.names, self.cache_dir = model, names, cache_dir
        # the SVDs run where the model is (the base copy waits on the CPU)
        self.device = device if device is not None else (first.device if first is not None else None)
        if base is None:
            w = weights_of(model)
            base = {n: w[n].load().detach().float().cpu().clone() for n in _select(w, names)}
        self.base = base
        self.steps: List[int] = []
        self.results: List[Dict[str, Shift]] = []

    @torch.no_grad()
    def record(self, step: int) -> Dict[str, Shift]:
        """ΔΣ, ΔD of every selected weight now; kept with ``step``."""
        r = spectral_shift(self.base, self.model, names=self.names, device=self.device, cache_dir=self.cache_dir)
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


def plot_shift(runs: Sequence[dict], path: str, titles: Optional[Sequence[str]] = None, *,
               share_axes: bool = False) -> str:
    """The paper's figure: one panel per run (a :func:`trajectory_json` dict), every layer a point
    (ΔΣ, ΔD) per checkpoint coloured by order, the mean as a thick path from the origin.
    ``share_axes``: one ΔΣ and one ΔD scale for all panels (to compare how far methods moved;
    by default each panel is scaled to its own run, as in the paper)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # no pyplot: the caller's backend stays as it is
    fig = Figure(figsize=(5 * len(runs), 4))
    axes = fig.subplots(1, len(runs), squeeze=False, sharex=share_axes, sharey=share_axes)
    cmap = colormaps["viridis"]
    for k, (ax, run) in enumerate(zip(axes[0], runs)):
        cps = run["checkpoints"]
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
    return path


def SpectralShiftCallback(every: int, *, names=None, base: Optional[Source] = None, json_path: Optional[str] = None,
                          plot: Optional[str] = None, device: Union[str, torch.device, None] = None):
    """A ``transformers.TrainerCallback`` recording ΔΣ/ΔD every ``every`` steps (and at the end):
    the mean goes to the Trainer's logs (``spectral_delta_sigma``, ``spectral_delta_d``), the
    trajectory to ``callback.tracker`` and, at the end of training, to ``json_path`` / ``plot``.

    The base defaults to the model's weights when training begins: when resuming from a
    checkpoint, pass the pre-trained weights as ``base``. Under DDP only the main process
    records (every rank holds the same weights); sharded models (ZeRO-3, FSDP) are not supported."""
    from transformers import TrainerCallback
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be an int >= 1, got {every!r}")
    if plot:
        import matplotlib  # noqa: F401  (fail now, not after training)

    class _Callback(TrainerCallback):
        def __init__(self):
            self.tracker: Optional[SpectralTracker] = None

        def on_train_begin(self, args, state, control, model=None, **kw):
            if state.is_world_process_zero:
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
