"""Model-level helpers: inject SORSA layers (atomically), merge/unmerge, select parameters,
disable adapters, count trainable parameters."""
from __future__ import annotations

import contextlib
import re
import warnings
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch.nn as nn

from ._validate import check_dropout_p, check_finite, check_float, check_rank
from . import checkpoints
from ._zero3 import full_shape, is_partitioned
from .adapters import adapter_config
from ._dtensor import is_dtensor
from .init import DEFAULT_CHUNK_BYTES, init_layers
from . import quant
from .layer import SORSAConv1D, SORSALinear, _check_init_args, check_alpha, is_conv1d
from .layer_4bit import SORSALinear4bit, dequantized_linear

MATCH_MODES = ("substring", "peft")


def _targets(target_modules) -> List[str]:
    if isinstance(target_modules, str):
        return [target_modules]
    if isinstance(target_modules, dict):  # the reference accepts a dict of names too
        target_modules = list(target_modules.values())
    if not isinstance(target_modules, (list, tuple, set)) or not all(isinstance(t, str) for t in target_modules):
        raise TypeError(f"target_modules must be a str or a list of str, got {target_modules!r}")
    if not target_modules or any(t == "" for t in target_modules):
        raise ValueError(f"target_modules must hold non-empty names, got {target_modules!r}")
    return list(target_modules)


def target_matcher(target_modules: Union[str, Sequence[str]], match: str = "substring"):
    """A predicate ``name -> bool`` for qualified module names.

    ``match="substring"``: sorsa 1.0.1's rule, a name matches when it contains one of the
    targets. ``match="peft"``: PEFT's rule, a list matches a name equal to a target or ending
    in ``"." + target``; a single str is a regular expression the whole name must match.
    """
    if match not in MATCH_MODES:
        raise ValueError(f"match must be one of {MATCH_MODES}, got {match!r}")
    targets = _targets(target_modules)
    if match == "substring":
        return lambda name: any(t in name for t in targets)
    if isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"target_modules is not a valid regular expression ({e}): {target_modules!r}") from None
        return lambda name: pattern.fullmatch(name) is not None
    return lambda name: any(name == t or name.endswith("." + t) for t in targets)


def _suggest(model: nn.Module, targets: Sequence[str]) -> str:
    """The model's linear layers by their short names (the last name component, as PEFT users
    write targets), with the closest to each unmatched target."""
    import difflib
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)]
    short = sorted({n.rpartition(".")[2] for n in linears})
    hints = []
    for t in targets:
        close = difflib.get_close_matches(t.rpartition(".")[2], short, n=1)
        if close:
            hints.append(f"{t!r} → {close[0]!r}?")
    text = f"Its linear layers' names end in: {short[:30]}{' ...' if len(short) > 30 else ''}"
    return text + (f"; did you mean {', '.join(hints)}" if hints else "")


def _validate_site(name: str, mod: nn.Module, r, init, quantize=None) -> None:
    if quant.is_linear4bit(mod):
        out_f, in_f = quant.weight_shape(mod.weight)
    else:
        check_float(f"{name}.weight", mod.weight)
        if is_dtensor(mod.weight):
            raise ValueError(f"{name}.weight is a sharded DTensor (FSDP2 fully_shard or tensor parallelism already "
                             f"applied): apply_sorsa must run before fully_shard, so that sorsa_A/S/B are sharded "
                             f"with their layer (distributed=True shares the SVDs over the ranks; or init=None, "
                             f"fully_shard, load the weights, then sk.init_layers(sk.sorsa_layers(model), ...))")
        if is_partitioned(mod.weight) and getattr(mod.weight, "_z3_optimizer", None) is not None:
            raise ValueError(f"{name}.weight belongs to an initialised DeepSpeed engine: apply_sorsa must run before "
                             f"deepspeed.initialize (on the model built under deepspeed.zero.Init), so that the "
                             f"optimizer gets the adapters")
        shape = full_shape(mod.weight)  # a ZeRO-3 weight's local data is empty
        out_f, in_f = (shape[1], shape[0]) if is_conv1d(mod) else shape
        if quantize is not None and is_partitioned(mod.weight):
            raise ValueError(f"{name}: quantize={quantize!r} is not supported on DeepSpeed ZeRO-3 partitioned weights")
        if quantize is not None and is_conv1d(mod):
            raise ValueError(f"{name}: quantize={quantize!r} supports nn.Linear targets, not transformers Conv1D")
    try:
        check_rank(r, in_f, out_f)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    if init is not None and r > 0:
        if mod.weight.is_meta:
            raise ValueError(f"{name}.weight is on the meta device, so it cannot be decomposed: pass init=None, then "
                             f"load the base weights (load_state_dict(..., assign=True)) and call "
                             f"sk.init_layers(list(sk.sorsa_layers(model))), or load an adapter with sk.load_adapter")
        if is_partitioned(mod.weight):
            return  # its owner rank checks the gathered weight before decomposing it (svd_factors)
        check_finite(f"{name}.weight", quant.dequantize(mod.weight) if quant.is_linear4bit(mod) else mod.weight)


def apply_sorsa(
    model: nn.Module,
    target_modules: Union[str, Sequence[str]],
    r: int,
    alpha: Optional[float] = None,
    dropout: float = 0.0,
    init: Optional[str] = "rsvd",
    *,
    match: str = "substring",
    progress: bool = False,
    chunk_bytes: Optional[int] = DEFAULT_CHUNK_BYTES,
    quantize: Optional[str] = None,
    quant_blocksize: int = 64,
    double_quant: bool = True,
    quant_iters: int = 0,
    distributed: bool = False,
    report: Optional[list] = None,
    **svd_kwargs,
) -> nn.Module:
    """Replace every ``nn.Linear`` (and transformers ``Conv1D``) whose qualified name matches
    ``target_modules`` by a :class:`SORSALinear` (:class:`SORSAConv1D`) sharing its weight and
    bias, then initialise all of them with ``init``: "rsvd" (default: batched randomized SVD,
    layers grouped by shape and processed in chunks of ``chunk_bytes``; ``svd_kwargs`` go to
    :func:`sorsa_kernels.rsvd`, with ``seed=0`` unless given — never the global RNG), "svd"
    (exact, as the reference) or None (adapters stay zero). ``progress`` shows a tqdm bar;
    ``report=[]`` receives one entry per shape group (method, rsvd iterations and error estimate,
    time; see :func:`sorsa_kernels.init.init_layers`).
    ``W_r`` is exact either way, so the model's output is unchanged (up to the 4-bit rounding of
    ``W_r`` with ``quantize`` or 4-bit bases: see below). A linear registered under
    several names is replaced by one SORSA layer everywhere. Returns ``model`` itself.

    ``distributed=True``: every rank of a ``torch.distributed`` job (DDP: the same model on every
    rank) decomposes a share of the matrices and receives the rest (see
    :func:`sorsa_kernels.init.init_layers`); equal to a one-process init bit for bit.

    DeepSpeed ZeRO-3 (a model built under ``deepspeed.zero.Init`` or loaded by transformers with a
    ZeRO-3 config; call on every rank, before ``deepspeed.initialize``): each SORSA layer keeps the
    partitioned ``weight`` and ``bias`` Parameters, its new ``sorsa_A/S/B`` are partitioned the same
    way, and the init is shared over the ranks whatever ``distributed`` says: each weight is
    gathered one at a time and kept whole only by the rank that decomposes it (see
    :func:`sorsa_kernels.init.init_layers`); equal to a one-process init bit for bit. FSDP2: call before ``fully_shard`` (sharded DTensor weights
    are refused); with ``init=None`` the init can follow ``fully_shard`` and the weights' loading:
    ``sk.init_layers(sk.sorsa_layers(model), ...)`` gathers each weight on one rank only. A model on
    the meta device takes ``init=None``; see ``init_layers`` for its init.

    ``match``: "substring" (default; sorsa 1.0.1's rule: a name matches when it contains a
    target) or "peft" (PEFT's rule: exact names or suffixes at a ``.`` boundary; a single str
    is a regex matched against the whole name). See :func:`target_matcher`.

    ``quantize``: "nf4" or "fp4" makes every target a :class:`SORSALinear4bit` (QSORSA): the SVD
    runs in float32 on the full-precision weight, then only ``W_r`` is quantized with bitsandbytes
    (``quant_blocksize``, ``double_quant``: QLoRA's defaults); ``A, S, B`` keep the weight dtype.
    Layers are converted one at a time, so at most one full-precision ``W_r`` exists at once.
    ``quant_iters = k`` re-fits the adapter to what quantization lost k times (LoftQ-style; the
    default keeps SORSA's exact top-r init). Targets that are bitsandbytes ``Linear4bit`` (a model
    loaded with ``BitsAndBytesConfig(load_in_4bit=True)``) are dequantized, decomposed and their
    residual re-quantized: with their own 4-bit settings when ``quantize`` is None (this warns: the
    second rounding changes the output slightly; the 4-bit options without ``quantize`` and with
    no 4-bit target raise).

    Atomic: every target is validated first (rank, finite float weight, init method and
    keywords, alpha, dropout) and any failure during conversion or init puts the original
    modules back, so on error the model is unchanged. Raises ``ValueError`` when nothing matches
    (naming already-converted SORSA layers when that is why); warns naming matched modules that
    have a weight but are neither ``nn.Linear`` nor ``Conv1D`` (skipped, e.g. ``Embedding``).
    """
    is_match = target_matcher(target_modules, match)
    targets = _targets(target_modules)
    check_rank(r)
    if r < 1:  # an r=0 layer has no adapter to train, save or export
        raise ValueError(f"r must be >= 1 for apply_sorsa (r=0 would add no adapter), got {r}")
    alpha = check_alpha(alpha)
    dropout = check_dropout_p(dropout, "dropout")
    _check_init_args(init, svd_kwargs)
    quant.check_quant_args(quantize, quant_blocksize, double_quant, quant_iters)
    if init not in (None, "svd"):
        svd_kwargs.setdefault("seed", 0)
    sites: List[Tuple[nn.Module, str, nn.Module]] = []  # (parent, attribute, old module)
    converted, skipped = [], []
    seen = set()
    for name, mod in model.named_modules(remove_duplicate=False):
        if not name or not is_match(name):
            continue
        if isinstance(mod, SORSALinear):
            converted.append(name)
            continue
        if not (isinstance(mod, nn.Linear) or is_conv1d(mod)):
            w = getattr(mod, "weight", None)
            if isinstance(w, nn.Parameter) and w.dim() >= 2:  # e.g. Embedding, Conv2d: say so
                skipped.append(f"{name} ({type(mod).__name__})")
            continue
        if id(mod) not in seen:
            seen.add(id(mod))
            _validate_site(name, mod, r, init, quantize)
        parent_name, _, attr = name.rpartition(".")
        sites.append((model.get_submodule(parent_name) if parent_name else model, attr, mod))
    if not sites:
        if converted:
            raise ValueError(
                f"target_modules={targets!r} matched only layers that are already SORSA layers "
                f"({converted[:10]}{' ...' if len(converted) > 10 else ''}): apply_sorsa converts nn.Linear/"
                f"Conv1D; to re-initialise existing adapters use sk.init_layers(list(sk.sorsa_layers(model)))")
        raise ValueError(f"target_modules={targets!r} matched no nn.Linear in the model (match={match!r}). "
                         f"{_suggest(model, targets)}")
    if not isinstance(target_modules, str) and len(targets) > 1:
        # a typo in one of several targets (["q_proj", "v_prj"]) must not pass as "q_proj only"
        names = [n for n, _ in model.named_modules() if n]
        unmatched = [t for t in targets if not any(target_matcher([t], match)(n) for n in names)]
        if unmatched:
            raise ValueError(
                f"target_modules entries {unmatched} match no module of the model (match={match!r}); the others "
                f"do. {_suggest(model, unmatched)}")
    if skipped:
        warnings.warn(f"apply_sorsa: target_modules also matched modules that are not nn.Linear/Conv1D; "
                      f"skipped: {skipped[:20]}{' ...' if len(skipped) > 20 else ''}", UserWarning, stacklevel=2)
    matched: Dict[int, SORSALinear] = {}
    bases4 = sorted({n for n, m in model.named_modules() if quant.is_linear4bit(m) and is_match(n)})
    if quantize is None and (quant_blocksize != 64 or double_quant is not True or (quant_iters and not bases4)):
        # the 4-bit options do nothing without quantize (4-bit bases keep their own format): say so
        raise ValueError(f"quant_blocksize={quant_blocksize!r}, double_quant={double_quant!r}, "
                         f"quant_iters={quant_iters!r} take effect only with quantize='nf4' or 'fp4'"
                         + (" (4-bit bases keep their own blocksize and double_quant)" if bases4 else ""))
    if bases4:
        # W_base = deq(q) is on the 4-bit grid, W_base − scale·B·diag(S)·A is not: quantizing it again adds a
        # second rounding, so unlike a full-precision base the model's output changes slightly
        warnings.warn(f"apply_sorsa: {len(bases4)} target(s) are bitsandbytes 4-bit layers ({bases4[:3]}"
                      f"{' ...' if len(bases4) > 3 else ''}); their residual W_r is quantized again, so the "
                      f"model's output changes by that rounding (about as much as QLoRA's quantization of the "
                      f"base itself). For the least change, load the base in full precision and pass "
                      f"quantize='nf4'; quant_iters=k re-fits the adapter to the rounding",
                      UserWarning, stacklevel=2)
    four_bit = quantize is not None or bool(bases4)
    if distributed and four_bit:  # 4-bit layers are decomposed one at a time as they are converted
        raise ValueError("distributed=True is not supported with 4-bit layers (quantize= or 4-bit bases): "
                         "each rank initialises them itself")
    zero = {id(old): old for _, _, old in sites if is_partitioned(old.weight)}
    frozen = {id(old): old.weight.requires_grad for old in zero.values()}
    try:
        if four_bit:
            matched = _convert_4bit(sites, r, alpha, dropout, init, progress, svd_kwargs,
                                    (quantize, quant_blocksize, double_quant, quant_iters))
        with warnings.catch_warnings(), _zero_init_paused(bool(zero)):
            warnings.simplefilter("ignore")  # alpha = 0 warned once above, not once per layer
            for _, _, old in sites:
                if id(old) not in matched:
                    cls = SORSAConv1D if is_conv1d(old) else SORSALinear
                    matched[id(old)] = cls.from_linear(old, r, alpha=alpha, dropout=dropout, init=None)
                    if id(old) in zero:
                        _adopt_zero3(matched[id(old)], old)
        for parent, attr, old in sites:
            setattr(parent, attr, matched[id(old)])
        if init is not None and r > 0:
            layers = [m for m in matched.values() if not isinstance(m, SORSALinear4bit)]
            if layers:
                init_layers(layers, init, chunk_bytes=chunk_bytes, progress=progress, distributed=distributed,
                            report=report, **svd_kwargs)
            for layer in layers:
                layer.init_config = {"method": init, **svd_kwargs}
    except BaseException:
        for parent, attr, old in sites:  # the old modules were never modified: put them back
            setattr(parent, attr, old)
        for key, flag in frozen.items():  # a ZeRO-3 weight is shared, not copied: its flag was changed
            zero[key].weight.requires_grad_(flag)
        raise
    checkpoints.install(model, adapter_config)  # transformers' save_pretrained must not write W_r alone
    return model


def _zero_init_paused(active: bool):
    """An active ``deepspeed.zero.Init`` suspended while SORSA layers are built (a no-op context
    without ZeRO-3 targets)."""
    if not active:
        return contextlib.nullcontext()
    from .integrations.deepspeed_init import paused_zero_init

    return paused_zero_init()


def _adopt_zero3(layer: SORSALinear, old: nn.Module) -> None:
    """Give ``layer`` the ZeRO-3 base's own partitioned ``weight`` and ``bias`` Parameters (their
    local data is empty: a copy would lose the partition) and partition its new zero adapters the
    same way (a collective: every rank converts the same layers in the same order)."""
    from .integrations.deepspeed_init import partition_like

    layer.weight, layer.bias = old.weight, old.bias
    layer.weight.requires_grad_(False)  # as from_linear freezes the weight of an r >= 1 layer
    partition_like(old.weight, [layer.sorsa_A, layer.sorsa_S, layer.sorsa_B])


def _convert_4bit(sites, r, alpha, dropout, init, progress, svd_kwargs, qargs) -> Dict[int, SORSALinear]:
    """4-bit SORSA layers for the sites that get one (all with ``quantize``, else the 4-bit bases),
    one layer at a time: dequantize a 4-bit base, decompose in full precision, quantize ``W_r``."""
    quantize, blocksize, double_quant, iters = qargs
    todo = {id(old): old for _, _, old in sites if quantize is not None or quant.is_linear4bit(old)}
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(todo), desc=f"SORSA init + 4-bit residual", unit="matrix")
    out: Dict[int, SORSALinear] = {}
    try:
        for key, old in todo.items():
            base = old
            fmt = (quantize, blocksize, double_quant)
            if quant.is_linear4bit(old):
                base = dequantized_linear(old)
                if quantize is None:  # the base's own 4-bit settings
                    fmt = (old.weight.quant_type, old.weight.blocksize, bool(old.weight.compress_statistics))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # alpha = 0 warned once by the caller
                layer = SORSALinear.from_linear(base, r, alpha=alpha, dropout=dropout, init=None)
            if init is not None:
                init_layers([layer], init, **svd_kwargs)
                layer.init_config = {"method": init, **svd_kwargs}
            out[key] = SORSALinear4bit.from_sorsa(layer, *fmt, quant_iters=iters)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return out


def sorsa_layers(model: nn.Module) -> Iterable[SORSALinear]:
    """Every :class:`SORSALinear` (and :class:`SORSAConv1D`) in ``model``, once each: yields the
    modules, not ``(name, module)`` pairs (use ``model.named_modules()`` for names)."""
    return (m for m in model.modules() if isinstance(m, SORSALinear))


def merge_sorsa(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (layers with ``merge_weights``). Training a merged
    layer warns once (its adapters would get no gradient); :func:`unmerge_sorsa` first."""
    for m in sorsa_layers(model):
        m._merge(True)
    return model


def unmerge_sorsa(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_sorsa`."""
    for m in sorsa_layers(model):
        m._merge(False)
    return model


def sorsa_parameters(model: nn.Module) -> List[nn.Parameter]:
    """Parameters whose name contains ``sorsa_`` (the reference's ``get_parameters``)."""
    return [p for n, p in model.named_parameters() if "sorsa_" in n]


def mark_only_sorsa_trainable(model: nn.Module) -> nn.Module:
    """``requires_grad`` True for ``sorsa_*`` parameters, False for all others."""
    for n, p in model.named_parameters():
        p.requires_grad = "sorsa_" in n
    return model


def print_trainable_parameters(model: nn.Module) -> Tuple[int, int]:
    """Print ``trainable params: … || all params: … || trainable%: …`` (PEFT's format) and
    return ``(trainable, total)``; shared parameters count once, a 4-bit weight as the number of
    weights it packs (two per byte, as PEFT counts them), not its bytes, a DeepSpeed ZeRO-3
    partition as its whole parameter."""
    trainable = total = 0
    for p in model.parameters():
        n = int(p.ds_numel) if is_partitioned(p) else (p.numel() * 2 if quant.is_params4bit(p) else p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    pct = 100 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}")
    return trainable, total


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every SORSA layer computes the *original* base model's output,
    ``x·(W_r + scale·B0·diag(S0)·A0)ᵀ + bias`` with the initial adapter (not the residual model
    that zeroing S would give). Merged layers are unmerged inside and re-merged on exit.
    Raises before changing anything if a layer's initial adapter is unknown."""
    layers = [m for m in sorsa_layers(model) if m.r > 0]
    unknown = [n for n, m in model.named_modules() if isinstance(m, SORSALinear) and m.r > 0
               and m.initial_adapter() is None]
    if unknown:
        raise RuntimeError(f"disable_adapters: the initial adapter of {unknown} is unknown (weights loaded "
                           f"from a state dict); load adapters with sk.load_adapter to keep it")
    merged = [m for m in layers if m.merged]
    for m in merged:
        m._merge(False)
    for m in layers:
        m._adapters_disabled = True
    try:
        yield model
    finally:
        for m in layers:
            m._adapters_disabled = False
        for m in merged:
            m._merge(True)
