"""The built-in benchmark tasks, made from this interpreter's standard library so that downstream figures need
nothing downloaded (docs/evaluation.md). Both draw on the documents the built-in corpus holds out from training (the
same 1 in `holdout_every`, default 50, as its validation split), so they judge what the model generalises.

- `stdlib_docstrings`: which of 4 functions a docstring belongs to. The target is the first line of a documented
  function's docstring; the four contexts are the one-line `def` headers of that function and of three others, each
  followed by the docstring's opening quotes, as the corpus writes them. The model is right when the docstring is
  most likely after its own function's header (lm-eval's multiple-input form, as winogrande uses: `doc_to_text`
  names the right context). A question of meaning: hard for a small model.
- `stdlib_lines`: which of 4 lines is real Python, after the three lines before it: the line as written, or its
  words shuffled three ways (indentation kept): minimal pairs in the manner of BLiMP, a question of syntax that a
  model learns early.
"""

from __future__ import annotations

import ast
import json
import os
import random
import sys
from pathlib import Path

from .sources import stdlib_split

TASKS = ("stdlib_docstrings", "stdlib_lines")
ITEMS = 400
"""Items per task at most (the held-out documents of CPython 3.11 give 99 docstring items and 320 lines)."""
PER_SOURCE = 30
"""`stdlib_lines` items per source file at most, so that a few long, repetitive files (codec tables) do not fill it."""


def held_out_sources(holdout_every: int) -> list[str]:
    """The Python sources among the documents the built-in corpus holds out, as text."""
    return [read().decode("utf-8", errors="replace") for name, read in stdlib_split("val", holdout_every)
            if name.endswith(".py")]


def docstring_items(holdout_every: int = 50, seed: int = 0, limit: int = ITEMS) -> list[dict]:
    """The task's items: {"contexts": 4 headers, "label": the right one's index, "target": the docstring line}."""
    functions = []
    for source in held_out_sources(holdout_every):
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        lines = source.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("__"):
                continue
            doc = ast.get_docstring(node)
            header = lines[node.lineno - 1].strip() if node.lineno <= len(lines) else ""
            if not doc or not header.startswith(("def ", "async def ")) or not header.endswith(":"):
                continue  # decorated, multi-line headers and undocumented functions are left out
            summary = doc.strip().splitlines()[0].strip()
            if 8 <= len(summary) <= 120:
                functions.append((header, summary))
    # A summary or a header shared by two functions (overrides in several classes) would make an item ambiguous.
    headers = [h for h, _ in functions]
    summaries = [s for _, s in functions]
    functions = sorted({(h, s) for h, s in functions if headers.count(h) == 1 and summaries.count(s) == 1})
    rng = random.Random(seed)
    rng.shuffle(functions)
    items = []
    for i, (header, summary) in enumerate(functions[:limit]):
        others = rng.sample([f for j, f in enumerate(functions) if j != i], 3)
        label = rng.randrange(4)
        headers = [h for h, _ in others]
        headers.insert(label, header)
        items.append({"contexts": [f'{h}\n    """' for h in headers], "label": label, "target": summary})
    return items


def line_items(holdout_every: int = 50, seed: int = 0, limit: int = ITEMS) -> list[dict]:
    """`stdlib_lines`' items: {"context": 3 lines, "choices": the next line and 3 shuffles of its words, "label"}."""
    rng = random.Random(seed)
    items = []
    for source in held_out_sources(holdout_every):
        lines, taken = source.splitlines(), 0
        for i in range(3, len(lines)):
            words = lines[i].split()
            if len(words) < 4 or rng.random() >= 0.5 or taken == PER_SOURCE:
                continue
            indent = lines[i][:len(lines[i]) - len(lines[i].lstrip())]
            real = indent + " ".join(words)
            shuffled = set()
            for _ in range(20):
                rng.shuffle(words)
                if indent + " ".join(words) != real:
                    shuffled.add(indent + " ".join(words))
                if len(shuffled) == 3:
                    break
            if len(shuffled) < 3:
                continue  # a line of repeated words has too few distinct shuffles
            label = rng.randrange(4)
            choices = sorted(shuffled)
            choices.insert(label, real)
            items.append({"context": "\n".join(lines[i - 3:i]) + "\n", "choices": choices, "label": label})
            taken += 1
    rng.shuffle(items)
    return items[:limit]


def builtin_task_dir(cache_dir: str | os.PathLike) -> Path:
    """The folder holding the built-in tasks' YAMLs and items (lm-eval's `include_path`), written once per interpreter
    under `cache_dir` (atomically: a concurrent writer leaves the same files)."""
    version = f"py{sys.version_info.major}.{sys.version_info.minor}"
    folder = Path(cache_dir).expanduser() / "tasks" / f"stdlib-{version}-v3"
    if all((folder / f"{task}.yaml").is_file() for task in TASKS):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    docstrings, lines = folder / "stdlib_docstrings.jsonl", folder / "stdlib_lines.jsonl"
    _write(docstrings, "".join(json.dumps(item) + "\n" for item in docstring_items()))
    _write(lines, "".join(json.dumps(item) + "\n" for item in line_items()))
    _write(folder / "stdlib_docstrings.yaml", _yaml("stdlib_docstrings", docstrings, [
        "doc_to_text: label          # an int: the contexts are the choices (multiple-input form)",
        "doc_to_choice: contexts",
        'doc_to_target: "{{target}}"'], ["acc"]))
    _write(folder / "stdlib_lines.yaml", _yaml("stdlib_lines", lines, [
        'doc_to_text: "{{context}}"',
        "doc_to_choice: choices",
        "doc_to_target: label"], ["acc", "acc_norm"]))
    return folder


def _yaml(task: str, items: Path, fields: list[str], metrics: list[str]) -> str:
    return "\n".join([
        f"task: {task}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(items))}",
        "test_split: test",
        "output_type: multiple_choice",
        *fields,
        'target_delimiter: ""',
        "metric_list:",
        *[line for m in metrics for line in (f"  - metric: {m}", "    aggregation: mean", "    higher_is_better: true")],
        "metadata:",
        "  version: 1.0",
        ""])


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
