"""The README's usage example runs as written."""
import os
import re


def test_readme_usage_example_runs():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "README.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has no python example"
    ns = {}
    exec(compile(blocks[0], "README.md", "exec"), ns)
    assert ns["reg"] is not None and ns["reg"] < 1e-3
    assert all(layer.merged for layer in ns["sk"].sorsa_layers(ns["model"]))
