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
    blocks = [b for b in readme.split("```") if "pip install" in b]
    assert "pip install -e ." in blocks[0] and "launch/" in blocks[0]
    assert 'pip install -e ".[test]" && pytest -q' in blocks[1]
    assert 'pip install -e ".[test]" && pytest -q' in (ROOT / ".ci" / "run").read_text()
