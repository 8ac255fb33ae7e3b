"""The built-in benchmark tasks (data/tasks.py, docs/evaluation.md): made from the standard library's held-out
documents, the same every time, each item's answer the real one, and loadable by lm-eval without a network."""

from __future__ import annotations

import ast
import json

import pytest

from data.tasks import TASKS, builtin_task_dir, docstring_items, held_out_sources, line_items


def test_docstring_items_name_the_function_each_docstring_documents():
    items = docstring_items()
    assert items == docstring_items() and len(items) >= 90
    documented = {}  # one-line header -> first docstring line, over the held-out sources
    for source in held_out_sources(50):
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and ast.get_docstring(node):
                documented.setdefault(lines[node.lineno - 1].strip(), set()).add(
                    ast.get_docstring(node).strip().splitlines()[0].strip())
    for item in items:
        headers = [c.removesuffix('\n    """') for c in item["contexts"]]
        assert len(set(headers)) == 4 and 0 <= item["label"] < 4
        assert item["target"] in documented[headers[item["label"]]]
        assert all(item["target"] not in documented[h] for i, h in enumerate(headers) if i != item["label"])


def test_line_items_hold_the_real_line_among_shuffles_of_its_words():
    items = line_items()
    assert items == line_items() and len(items) >= 200
    sources = "\n".join(" ".join(line.split()) for s in held_out_sources(50) for line in s.splitlines())
    for item in items:
        real = item["choices"][item["label"]]
        assert " ".join(real.split()) in sources
        assert len(set(item["choices"])) == 4
        assert all(sorted(c.split()) == sorted(real.split()) and c != real
                   for i, c in enumerate(item["choices"]) if i != item["label"])


def test_lm_eval_loads_the_built_in_tasks_offline(tmp_path):
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager
    folder = builtin_task_dir(tmp_path)
    assert builtin_task_dir(tmp_path) == folder  # written once
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    loaded = manager.load(list(TASKS))["tasks"]
    assert sorted(loaded) == sorted(TASKS)
    lines = [json.loads(line) for line in (folder / "stdlib_lines.jsonl").read_text().splitlines()]
    assert lines == line_items()
