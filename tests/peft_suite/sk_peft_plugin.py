"""pytest plugin that runs PEFT's own test suite (the ``tests/`` folder of the installed peft's
sdist) against :func:`sorsa_kernels.integrations.peft.accelerate`; driven by
``.ci/stage_12_peft_suite.sh``, loaded with ``-p sk_peft_plugin`` (this folder on ``PYTHONPATH``).

* Selection: PEFT's LoRA cases of ``test_custom_models.py`` and ``test_initialization.py``, and
  ``test_tuners_utils.py``'s layer / model status and rank / alpha pattern tests
  (:func:`is_lora_case`), minus the hub-dependent tests listed in ``hub_tests.txt``.
* ``--sk-accelerate``: every model PEFT builds goes through ``accelerate(model, backend="torch")``
  right after PEFT injects adapters into it (``BaseTuner.inject_adapter``: ``get_peft_model``,
  ``PeftModel.from_pretrained`` / ``load_adapter``, ``add_adapter``, ``inject_adapter_in_model``,
  ``LoraModel(...)``). ``backend="torch"`` because ``"auto"`` keeps CPU layers on PEFT's own forward,
  which would leave the fused op untested on this machine.
* ``--sk-outcomes PATH``: one JSON file with each selected test's outcome (passed / failed / error /
  skipped / xfailed) and, accelerated, the counts: LoRA layers served, accelerated-layer calls and
  fused calls (the rest took PEFT's forward: merged, disabled, several adapters, ...).
  ``compare.py`` compares two such files.
"""
from __future__ import annotations

import json
import re
from typing import Dict, List, Optional

import pytest

# test_initialization.py classes built on LoraConfig (LoRA init schemes, KaSA, CorDA, EVA, hotswap,
# scaling, weight tying, loading): run whole. The other classes there test other tuners.
LORA_INIT_CLASSES = frozenset({
    "TestLoraInitialization", "TestKasaInitialization", "TestCordaInitialization", "TestEvaInitialization",
    "TestHotSwapping", "TestScaling", "TestLowCpuMemUsage", "TestNamingConflictWarning",
    "TestCustomModelConfigWarning", "TestWeightTying", "TestNoInfiniteRecursionDeepspeed",
})
# test_custom_models.py classes that test LoRA layers only
LORA_CUSTOM_CLASSES = frozenset({"TestMultiRankAdapter", "TestLayerRepr", "TestDynamicDispatch"})
# test_tuners_utils.py: get_layer_status() / get_model_status() (they read a layer's class name
# through its repr) and per-module rank / alpha on LoRA models
LORA_TUNER_UTILS_CLASSES = frozenset({"TestModelAndLayerStatus", "TestRankAndAlphaPattern"})
# a test's own name naming LoRA or DoRA (as a word: not AdaLoRA, GraLoRA, ...)
_LORA_WORD = re.compile(r"(?:^|_)(?:lora|dora)(?:_|$)")


def is_lora_case(nodeid: str) -> bool:
    """Whether ``nodeid`` (``tests/<file>::<Class>::<test>[<params>]``) is one of PEFT's LoRA cases.

    ``test_custom_models.py`` parametrises one matrix over every tuner; its LoRA rows carry
    ``-LoraConfig-`` in the id (case-sensitive: ``AdaLoraConfig``, ``GraloraConfig`` are other
    tuners). Tests outside the matrix count when their class is a LoRA class or their name says
    lora / dora."""
    path, _, rest = nodeid.partition("::")
    parts = rest.split("::")
    cls = parts[0] if len(parts) > 1 else ""
    name, _, params = parts[-1].partition("[")
    if path.endswith("test_initialization.py"):
        return cls in LORA_INIT_CLASSES
    if path.endswith("test_tuners_utils.py"):
        return cls in LORA_TUNER_UTILS_CLASSES
    if path.endswith("test_custom_models.py"):
        return "-LoraConfig-" in params or cls in LORA_CUSTOM_CLASSES or bool(_LORA_WORD.search(name))
    return False


def read_excluded(path: str) -> Dict[str, str]:
    """``nodeid  # reason`` lines (``#`` comments and blank lines ignored) -> {nodeid: reason};
    a line without a reason is an error: every exclusion says why."""
    out: Dict[str, str] = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            nodeid, sep, why = line.partition("  # ")
            if not sep or not why.strip():
                raise pytest.UsageError(f"{path}:{n}: expected 'nodeid  # reason', got {line.rstrip()!r}")
            out[nodeid.strip()] = why.strip()
    return out


def pytest_addoption(parser):
    group = parser.getgroup("sorsa-kernels PEFT suite")
    group.addoption("--sk-accelerate", action="store_true",
                    help="pass every model PEFT builds through sorsa_kernels' accelerate(backend='torch')")
    group.addoption("--sk-outcomes", default=None, help="write per-test outcomes and counts to this JSON file")
    group.addoption("--sk-exclude", default=None, help="file of 'nodeid  # reason' lines to deselect")


class _Counts:
    """Layers served and calls made by accelerated layers in this process."""

    def __init__(self):
        self.layers = 0
        self.calls = 0
        self.fused = 0
        self.checked = 0  # fused calls compared with PEFT's forward
        self.grad_checked = 0  # ... and their gradients


def _install_accelerate(counts: _Counts) -> None:
    """Wrap PEFT's adapter injection so each model it builds is accelerated, and count."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.tuners_utils import BaseTuner

    from sorsa_kernels.integrations.peft import forward as skf

    inject = BaseTuner.inject_adapter

    def inject_and_accelerate(self, model, *args, **kwargs):
        inject(self, model, *args, **kwargs)
        before = sum(type(m) is LoraLinear for m in model.modules())
        skf.accelerate(model, backend="torch", warn=False)
        counts.layers += before - sum(type(m) is LoraLinear for m in model.modules())

    BaseTuner.inject_adapter = inject_and_accelerate

    op = skf.sorsa_linear

    def counted_op(*args, **kwargs):
        counts.fused += 1
        return op(*args, **kwargs)

    skf.sorsa_linear = counted_op  # forward.py calls the op through its module global
    fwd = skf.AcceleratedLoraLinear.forward

    def counted_forward(self, *args, **kwargs):
        counts.calls += 1
        fused_before = counts.fused
        out = fwd(self, *args, **kwargs)
        if counts.fused > fused_before and counts.checked < CHECKS:
            _check_against_peft(self, out, args, kwargs, counts)
        return out

    skf.AcceleratedLoraLinear.forward = counted_forward


#: fused calls per process whose output and gradients are compared with PEFT's own forward (a test
#: passing accelerated proves little where it never looks at a gradient)
CHECKS = 400


def _check_against_peft(layer, out, args, kwargs, counts: "_Counts") -> None:
    """Raise (failing the test) unless the fused call's output and gradients equal PEFT's forward on
    the same input. Only calls without active dropout (the masks differ by design), fp32."""
    import torch
    from peft.tuners.lora import Linear as LoraLinear

    x = args[0] if args else None
    drop = [m for m in layer.lora_dropout.values() if isinstance(m, torch.nn.Dropout) and m.p > 0 and m.training]
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or drop or torch.is_inference_mode_enabled():
        return
    counts.checked += 1
    with torch.random.fork_rng(devices=[]):  # the check must not move the tests' random streams
        ref = LoraLinear.forward(layer, *args, **kwargs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"fused output != PEFT's: {m}")
    if not (torch.is_grad_enabled() and out.requires_grad and ref.requires_grad):
        return
    wrt = [t for t in [x] + [p for p in layer.parameters() if p.requires_grad] if t.requires_grad]
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(counts.checked), dtype=out.dtype)
    got = torch.autograd.grad(out, wrt, dy, retain_graph=True, allow_unused=True)
    want = torch.autograd.grad(ref, wrt, dy, retain_graph=True, allow_unused=True)
    for g, w in zip(got, want):
        if g is None or w is None:
            assert (g is None) == (w is None or not w.any()), "fused gradient presence != PEFT's"
            continue
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=lambda m: f"fused gradient != PEFT's: {m}")
    counts.grad_checked += 1


class _Recorder:
    """Per-test outcome from the setup / call / teardown reports."""

    def __init__(self, config, counts: Optional[_Counts]):
        self.config = config
        self.counts = counts
        self.outcomes: Dict[str, str] = {}
        self.excluded: Dict[str, str] = {}
        self.stale: List[str] = []
        self.selected = 0

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config, items):
        path = config.getoption("--sk-exclude")
        excluded = read_excluded(path) if path else {}
        keep, drop = [], []
        for item in items:
            (keep if is_lora_case(item.nodeid) and item.nodeid not in excluded else drop).append(item)
        # listed but not collected: recorded for another peft version (said in the summary; a
        # missing entry excludes nothing, so it cannot hide a test)
        self.stale = sorted(set(excluded) - {i.nodeid for i in items})
        self.excluded = {i.nodeid: excluded[i.nodeid] for i in drop if i.nodeid in excluded}
        self.selected = len(keep)
        items[:] = keep
        config.hook.pytest_deselected(items=drop)

    def pytest_runtest_logreport(self, report):
        prev = self.outcomes.get(report.nodeid)
        if report.failed:
            now = "failed" if report.when == "call" else "error"
        elif report.skipped:
            now = "xfailed" if hasattr(report, "wasxfail") else "skipped"
        elif report.when == "call":
            now = "passed"
        else:
            now = None  # a passing setup / teardown says nothing yet
        if now is not None and prev not in ("failed", "error"):
            self.outcomes[report.nodeid] = now

    def pytest_sessionfinish(self, session):
        path = self.config.getoption("--sk-outcomes")
        if not path:
            return
        counts = None if self.counts is None else vars(self.counts)
        with open(path, "w") as f:
            json.dump({"accelerated": self.counts is not None, "selected": self.selected,
                       "excluded": self.excluded, "counts": counts, "outcomes": self.outcomes}, f, indent=0)

    def pytest_terminal_summary(self, terminalreporter):
        line = f"sorsa-kernels PEFT suite: {self.selected} LoRA tests selected, {len(self.excluded)} hub tests excluded"
        if self.counts is not None:
            c = self.counts
            line += (f"; accelerated: {c.layers} LoRA layers served, {c.calls} calls, {c.fused} fused "
                     f"({c.calls - c.fused} on PEFT's forward), {c.checked} fused calls checked against "
                     f"PEFT's output ({c.grad_checked} also in every gradient)")
        terminalreporter.write_line(line)
        if self.stale:
            terminalreporter.write_line(f"  {len(self.stale)} listed hub tests are not in this peft's suite "
                                        f"(list recorded for another version), e.g. {self.stale[0]}")


def pytest_configure(config):
    counts = None
    if config.getoption("--sk-accelerate"):
        counts = _Counts()
        _install_accelerate(counts)
    config.pluginmanager.register(_Recorder(config, counts), "sk_peft_recorder")
