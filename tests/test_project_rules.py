"""Project rules that code review alone would let slip: model/ stays pure PyTorch, no pickle, README commands."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN_IN_MODEL = ("torch.distributed", "deepspeed", "hydra", "omegaconf", "trainer", "data", "transformers",
                      "wandb", "datasets")


def _imports(path: Path) -> list[str]:
    """Absolute imports of a file, plus `torch.distributed` reached as an attribute of an imported torch."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Attribute) and node.attr == "distributed" and \
                getattr(node.value, "id", None) == "torch":
            names.append("torch.distributed")
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "model").rglob("*.py")), ids=lambda p: p.name)
def test_model_package_is_pure_pytorch(path):
    bad = [name for name in _imports(path)
           if any(name == root or name.startswith(root + ".") for root in FORBIDDEN_IN_MODEL)]
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}; parallelism and configs belong in trainer/"


def test_the_purity_check_catches_a_forbidden_import(tmp_path):
    probe = tmp_path / "probe.py"
    for source in ("from torch import distributed\n", "import torch.distributed as dist\n",
                   "import torch\ntorch.distributed.all_reduce(x)\n"):
        probe.write_text(source)
        assert "torch.distributed" in _imports(probe), source


def test_no_pickle_loading_in_project_code():
    for folder in ("model", "trainer", "data", "launch"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            unpicklers = [n for n in _imports(path) if n.split(".")[0] in ("pickle", "dill", "cloudpickle", "joblib")]
            assert not unpicklers, f"{path}: imports {unpicklers}"
            assert "weights_only=False" not in text, path
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load" and \
                        getattr(node.func.value, "id", None) == "torch":
                    kwargs = {k.arg: k.value for k in node.keywords}
                    assert "weights_only" in kwargs and getattr(kwargs["weights_only"], "value", None) is True, \
                        f"{path}: torch.load without weights_only=True"
            assert "trust_remote_code=True" not in text, path


def test_readme_starts_with_the_two_setup_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    blocks = [b for b in readme.split("```")[1::2] if "pip install" in b]  # code blocks, not prose
    assert "pip install -e ." in blocks[0] and "launch/" in blocks[0]
    assert 'pip install -e ".[test]" && pytest -q' in blocks[1]
    assert 'pip install -e ".[test]" && pytest -q' in (ROOT / ".ci" / "run").read_text()


PACKAGES = ("model", "data", "trainer", "launch")


def _module_graph(with_packages: bool = False) -> dict[str, set[str]]:
    """{project module: project modules it imports}, relative imports resolved, imports inside functions and
    `if TYPE_CHECKING:` blocks included (a cycle through them is still a tangle to read). `with_packages`: also
    the packages whose __init__ an import runs first (a.b for a.b.c), for what a module pulls in at run time; a
    package re-exporting its modules is not a cycle, so the cycle check leaves them out."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            found.update(t for t in targets if t in modules and t != name)
            if with_packages:
                found.update(p for t in targets for p in _parents(t) if p in modules and p != name)
        graph[name] = found
    return graph


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (or a module importing itself)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_among_the_projects_modules():
    graph = _module_graph()
    assert "trainer.train" in graph and "trainer.engines.base" in graph["trainer.engines.builtin"]
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


PURE_SCHEDULES = "torch.distributed.pipelining"
"""Allowed: its schedule classes compute their action lists on stand-in stages, without a process group
(trainer/schedules.py), which is how validation checks a schedule against the layout and the dry run reads it."""


def test_config_validation_and_the_layout_import_neither_deepspeed_nor_torch_distributed():
    """Validating a config (and the dry run's arithmetic) must not need DeepSpeed or a process group: the modules
    `trainer.config` reaches import neither, directly or through other project modules and their packages (torch's
    pipeline schedules excepted, `PURE_SCHEDULES`)."""
    graph = _module_graph(with_packages=True)
    reached, todo = set(), ["trainer.config", "trainer.layout"]
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo += graph[name]
    for name in sorted(reached):
        path = ROOT / (name.replace(".", "/") + ".py")
        path = path if path.exists() else ROOT / name.replace(".", "/") / "__init__.py"
        heavy = [n for n in _imports(path) if n.split(".")[0] == "deepspeed" or (
            n.startswith("torch.distributed") and not n.startswith(PURE_SCHEDULES))]
        assert not heavy, f"{name} (reached from trainer.config) imports {heavy}"


def test_trainer_functions_fit_on_a_screen():
    """A function over ~80 lines wants splitting; the training loop reads like a story."""
    long = []
    for path in sorted((ROOT / "trainer").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert not long, long
