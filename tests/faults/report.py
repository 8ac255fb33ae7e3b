"""The fault-injection suite's figures: every test writes one JSON line (docs/reliability.md lists the tests).

Lines go to stdout (shown with `pytest -s` or in a failure's report) and are appended to the file named by
LATENTMOE_FAULT_RESULTS, when set, so trends can be compared across commits."""

from __future__ import annotations

import json
import os


def record(test: str, **figures) -> dict:
    line = {"test": test, **figures}
    text = json.dumps(line, sort_keys=False)
    print(text, flush=True)
    target = os.environ.get("LATENTMOE_FAULT_RESULTS")
    if target:
        with open(target, "a", encoding="utf-8") as f:
            f.write(text + "\n")
    return line
