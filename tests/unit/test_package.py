"""The package's shape: one namespace, dependencies pointing one way, a pinned public API."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import thaw_agents

ROOT = Path(__file__).resolve().parents[2]


def test_public_api_is_pinned() -> None:
    assert thaw_agents.__all__ == sorted(thaw_agents.__all__)
    assert set(thaw_agents.__all__) == {
        "BranchResult",
        "ConfigError",
        "DependencyError",
        "EngineError",
        "ForkHandle",
        "ForkPool",
        "ModelPreparationError",
        "PoolError",
        "PoolTimeoutError",
        "SnapshotChangedError",
        "SnapshotChecksumError",
        "SnapshotError",
        "SnapshotFormatError",
        "SnapshotMismatchError",
        "SnapshotNotFoundError",
        "SnapshotReadError",
        "SnapshotTruncatedError",
        "SnapshotVersionError",
        "SnapshotWriteError",
        "ThawError",
        "WorkerDiedError",
        "__version__",
        "afork_completions",
        "default_model",
        "engine_kwargs",
        "fork",
        "fork_completions",
        "make_llm",
        "with_fork",
    }
    for name in thaw_agents.__all__:
        assert hasattr(thaw_agents, name), name


def test_errors_form_one_tree() -> None:
    for name in thaw_agents.__all__:
        obj = getattr(thaw_agents, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, thaw_agents.ThawError), name


def _imports(folder: Path) -> set[str]:
    found: set[str] = set()
    for file in folder.rglob("*.py"):
        tree = ast.parse(file.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
            elif isinstance(node, ast.ImportFrom) and node.level > 0:
                found.add("." * node.level + (node.module or ""))
    return found


def test_accel_imports_nothing_of_ours() -> None:
    bad = {m for m in _imports(ROOT / "accel") if m.startswith("thaw_agents") or m.startswith("..")}
    assert bad == set()


def test_integrations_use_only_the_public_api() -> None:
    bad = {
        m
        for m in _imports(ROOT / "integrations")
        if (m.startswith("thaw_agents.") and m.split(".")[1].startswith("_")) or m.startswith("..")
    }
    assert bad == set()


def test_subpackages_import_from_the_install() -> None:
    code = (
        "import thaw_agents.accel as a, thaw_agents.integrations as i, vllm; "
        "print(a.__file__); print(i.__file__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    accel_file, integ_file = out.stdout.split()
    assert Path(accel_file).parent.name == "accel"
    assert Path(integ_file).parent.name == "integrations"


def test_wheel_maps_the_namespace(tmp_path: Path) -> None:
    """The built wheel holds thaw_agents/accel and thaw_agents/integrations."""
    import zipfile

    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("thaw_agents-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "thaw_agents/accel/__init__.py" in names
    assert "thaw_agents/integrations/__init__.py" in names
    assert "thaw_agents/connector/facade.py" in names
    assert "thaw_agents/pool/_worker.py" in names
    assert "thaw_agents/py.typed" in names


def test_tree_is_ruff_clean() -> None:
    """`make lint` in the test run: CI fails on a lint or format regression."""
    ruff = Path(sys.executable).parent / "ruff"
    for args in (["check"], ["format", "--check"]):
        out = subprocess.run([str(ruff), *args, str(ROOT)], capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 0, out.stdout + out.stderr
