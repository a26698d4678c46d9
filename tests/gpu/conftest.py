"""GPU tests: marked ``gpu``, skipped (cleanly, at collection) without a CUDA device.

They run the real vLLM engine on the GPU. ``THAW_GPU_MODEL`` names the model folder (default:
the default model) and ``THAW_GPU_LOAD_FORMAT`` its load format (``dummy`` for an 8B-shaped
config without weights files). ``tests/gpu/device_run.sh`` runs them on the lent H200.
"""

from __future__ import annotations

import pytest


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


HAS_CUDA = _cuda()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if not HAS_CUDA:
                item.add_marker(skip)
