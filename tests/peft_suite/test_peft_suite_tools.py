"""The tools of .ci/stage_12_peft_suite.sh: which PEFT tests count as LoRA cases, the recorded list
of hub tests, and the comparison that fails the stage."""
import importlib.util
import json
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def load(name):
    spec = importlib.util.spec_from_file_location(f"peft_suite_{name}", os.path.join(HERE, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


plugin, compare = load("sk_peft_plugin"), load("compare")


@pytest.mark.parametrize("nodeid, lora", [
    ("tests/test_custom_models.py::TestPeftCustomModel::test_merge_layers[Vanilla MLP 1 LoRA-MLP-LoraConfig-config_kwargs6]", True),
    ("tests/test_custom_models.py::TestPeftCustomModel::test_merge_layers[Vanilla MLP 1 AdaLoRA-MLP-AdaLoraConfig-config_kwargs0]", False),
    ("tests/test_custom_models.py::TestMultipleActiveAdapters::test_multiple_active_adapters_forward[GraLoRA Same-gralora-GraloraConfig-config_kwargs_114-config_kwargs_214]", False),
    ("tests/test_custom_models.py::TestRequiresGrad::test_requires_grad_lora_conv2d", True),
    ("tests/test_custom_models.py::TestPeftCustomModel::test_gralora_and_hybrid_gralora_parameter_count", False),
    ("tests/test_custom_models.py::TestLayerRepr::test_repr_lora_embedding", True),
    ("tests/test_initialization.py::TestKasaInitialization::test_kasa_rejects_too_large_rank", True),
    ("tests/test_initialization.py::TestVeraInitialization::test_vera_mixing_save_projection_raises", False),
    ("tests/test_tuners_utils.py::TestModelAndLayerStatus::test_module_type_small", True),
    ("tests/test_tuners_utils.py::TestTargetedModuleNames::test_one_targeted_module_regex", False),
    ("tests/test_other.py::TestModulesToSaveAttributeAccess::test_lora_something", False),
])
def test_lora_case_selection(nodeid, lora):
    assert plugin.is_lora_case(nodeid) is lora


def test_recorded_hub_list_reads(tmp_path):
    listed = plugin.read_excluded(os.path.join(HERE, "hub_tests.txt"))
    assert len(listed) >= 30 and all(plugin.is_lora_case(t) for t in listed)  # only selected tests need listing
    assert all("from the hub" in why for why in listed.values())
    bad = tmp_path / "bad.txt"
    bad.write_text("tests/test_custom_models.py::TestLayerRepr::test_repr_lora_linear\n")
    with pytest.raises(pytest.UsageError, match="expected 'nodeid  # reason'"):
        plugin.read_excluded(str(bad))


def test_compare_fails_on_a_test_that_passes_only_as_is(tmp_path, capsys):
    def write(name, accelerated, outcomes, fused=3, grad_checked=2):
        path = tmp_path / f"{name}.json"
        counts = {"layers": 2, "calls": 4, "fused": fused, "checked": 2, "grad_checked": grad_checked} \
            if accelerated else None
        path.write_text(json.dumps({"accelerated": accelerated, "selected": len(outcomes), "excluded": {},
                                    "counts": counts, "outcomes": outcomes}))
        return str(path)

    asis = write("asis", False, {"a": "passed", "b": "passed", "c": "failed", "d": "skipped"})
    same = write("acc", True, {"a": "passed", "b": "passed", "c": "failed", "d": "passed"})
    assert compare.main([asis, same]) == 0
    assert "every test that passes as-is passes accelerated" in capsys.readouterr().out
    for outcomes in ({"a": "passed", "b": "error", "c": "failed", "d": "skipped"},   # errored
                     {"a": "passed", "b": "skipped", "c": "passed", "d": "skipped"},  # skipped
                     {"a": "passed", "c": "passed", "d": "skipped"}):                 # missing
        assert compare.main([asis, write("acc", True, outcomes)]) == 1
        assert "REGRESSION" in capsys.readouterr().out
    assert compare.main([asis, write("acc", True, {"a": "passed", "b": "passed"}, fused=0)]) == 1
    assert compare.main([same, asis]) == 2  # the runs swapped
    # fused calls whose gradients were never compared with PEFT's: the run proves nothing
    assert compare.main([asis, write("acc", True, {"a": "passed", "b": "passed", "c": "failed", "d": "passed"},
                                      grad_checked=0)]) == 1
