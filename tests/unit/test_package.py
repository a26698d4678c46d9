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
        "ChatThaw",
        "ConfigError",
        "DependencyError",
        "EngineError",
        "ForkHandle",
        "ForkPool",
        "ModelPreparationError",
        "PoolError",
        "PoolTimeoutError",
        "RequestTimeoutError",
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
        "SwapResult",
        "ThawError",
        "WorkerDiedError",
        "__version__",
        "afork_completions",
        "aswap_weights",
        "default_model",
        "engine_kwargs",
        "fork",
        "fork_completions",
        "fork_fanout",
        "fork_fanout_sync",
        "fork_sends",
        "make_llm",
        "swap_weights",
        "trunk_of",
        "with_fork",
    }
    for name in thaw_agents.__all__:
        assert hasattr(thaw_agents, name), name


def test_short_imports_are_the_integrations_objects() -> None:
    from thaw_agents import ChatThaw, fork_sends
    from thaw_agents.integrations import langgraph

    assert ChatThaw is langgraph.ChatThaw and fork_sends is langgraph.fork_sends
    assert set(langgraph.__all__) <= set(thaw_agents.__all__)
    assert "ChatThaw" in dir(thaw_agents)


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)


def test_import_does_not_load_langchain() -> None:
    out = _python(
        "import sys, thaw_agents; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('langchain_core', 'langgraph')))"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_short_import_without_langchain_names_the_extra() -> None:
    # None in sys.modules makes `import langchain_core` fail as if it were not installed.
    out = _python(
        "import sys; sys.modules['langchain_core'] = None\n"
        "import thaw_agents\n"
        "try:\n"
        "    from thaw_agents import ChatThaw\n"
        "except thaw_agents.DependencyError as exc:\n"
        "    print(type(exc).__name__, isinstance(exc, ImportError), exc)\n"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("DependencyError True "), out.stdout
    assert "pip install 'thaw-agents[langgraph]'" in out.stdout and "ChatThaw" in out.stdout
    missing = _python("import thaw_agents; thaw_agents.no_such_name")
    assert "AttributeError" in missing.stderr and "no_such_name" in missing.stderr


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
    # Every subpackage of the source tree is in the wheel (pyproject lists them by hand).
    for init in (ROOT / "thaw_agents").glob("*/__init__.py"):
        sub = init.parent.name
        assert f"thaw_agents/{sub}/__init__.py" in names, f"pyproject's packages lacks thaw_agents.{sub}"
    assert "thaw_agents/py.typed" in names


def test_tree_is_ruff_clean() -> None:
    """`make lint` in the test run: CI fails on a lint or format regression."""
    ruff = Path(sys.executable).parent / "ruff"
    for args in (["check"], ["format", "--check"]):
        out = subprocess.run([str(ruff), *args, str(ROOT)], capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 0, out.stdout + out.stderr


def test_every_test_folder_is_collected() -> None:
    """pytest's testpaths name the test folders (so tests/smoke stays out): a new folder of tests
    must be added there, or `make test` would silently skip it."""
    import tomllib

    pytest_options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    testpaths = pytest_options["testpaths"]
    folders = {str(p.parent.relative_to(ROOT)) for p in (ROOT / "tests").glob("*/test_*.py")}
    assert folders - {"tests/smoke"} <= set(testpaths)
    assert "tests/smoke" not in testpaths and (ROOT / "tests/smoke/smoke_wheel.py").is_file()
