"""Compare the two runs of PEFT's suite written by ``sk_peft_plugin.py --sk-outcomes``: as-is and
with every model accelerated. Exit 1 when a test that passed as-is did not pass accelerated
(failed, errored, skipped or missing), when the as-is run passed no test, or when the accelerated
run made no fused call (the op went untested); print the counts either way.

    python compare.py ASIS.json ACCELERATED.json
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from typing import List


def regressions(asis: dict, accelerated: dict) -> List[str]:
    """Tests that passed as-is and did not pass accelerated, in as-is order."""
    acc = accelerated["outcomes"]
    return [t for t, o in asis["outcomes"].items() if o == "passed" and acc.get(t) != "passed"]


def main(argv: List[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        asis = json.load(f)
    with open(argv[1]) as f:
        acc = json.load(f)
    if asis["accelerated"] or not acc["accelerated"]:
        print(f"expected an as-is run then an accelerated run, got accelerated={asis['accelerated']}, "
              f"{acc['accelerated']}", file=sys.stderr)
        return 2
    for name, run in (("as-is", asis), ("accelerated", acc)):
        tally = ", ".join(f"{n} {o}" for o, n in sorted(Counter(run["outcomes"].values()).items()))
        print(f"{name}: {run['selected']} selected, {len(run['excluded'])} hub tests excluded: {tally}")
    c = acc["counts"]
    print(f"accelerated: {c['layers']} LoRA layers served, {c['calls']} calls of served layers, "
          f"{c['fused']} fused (the rest took PEFT's forward: merged, disabled, several adapters, ...); "
          f"{c.get('checked', 0)} fused calls compared with PEFT's forward ({c.get('grad_checked', 0)} in every gradient)")
    if c.get("fused") and not c.get("grad_checked"):
        print("no fused call's gradients were compared with PEFT's: the accelerated run proves nothing", file=sys.stderr)
        return 1
    bad = regressions(asis, acc)
    for t in bad:
        print(f"REGRESSION ({acc['outcomes'].get(t, 'missing')} accelerated, passed as-is): {t}")
    if bad:
        print(f"{len(bad)} tests pass as-is and not accelerated")
        return 1
    if not any(o == "passed" for o in asis["outcomes"].values()):
        print("the as-is run passed no test: nothing was compared")
        return 1
    if c["fused"] == 0:
        print("the accelerated run made no fused call: the op was not exercised")
        return 1
    print("every test that passes as-is passes accelerated")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
