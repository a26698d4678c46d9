"""LangChain's standard unit suite for ChatThaw: construction, parameters, tool and schema binding.

No engine starts here: ChatThaw builds its engine on the first call, and these tests make none.
``__snapshots__/test_chat_models.ambr`` is the serialised model ``test_serdes`` compares against
(``pytest tests/unit_tests --snapshot-update`` rewrites it; read the diff: no secret may appear).
"""

from __future__ import annotations

import os
from unittest import mock

import pytest
from helpers.standard import ChatThawCapabilities
from langchain_core.load import dumpd, load
from langchain_tests.unit_tests import ChatModelUnitTests

from thaw_agents import ChatThaw


class TestChatThawUnit(ChatThawCapabilities, ChatModelUnitTests):
    """ChatThaw in process (the default model); the suite's own tests, unchanged."""

    @property
    def init_from_env_params(self) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
        # The server's API key (for ChatThaw(base_url=...)) comes from the environment, as a secret.
        return {"THAW_AGENTS_API_KEY": "key-from-env"}, {}, {"api_key": "key-from-env"}

    @pytest.mark.xfail(
        strict=True,
        reason="langchain-core's load(allowed_objects='all') admits only the classes in its own "
        "mapping (core and listed partners), never a third-party one; the serialised form is pinned "
        "by the snapshot here and the round trip is tested with ChatThaw allowed explicitly",
    )
    def test_serdes(self, model, snapshot) -> None:  # type: ignore[no-untyped-def]
        super().test_serdes(model, snapshot)


def test_serialised_chat_thaw_loads_back_with_its_key_from_the_environment() -> None:
    model = ChatThaw(temperature=0.3, max_tokens=7, api_key="secret-value")
    data = dumpd(model)
    assert "secret-value" not in repr(data)
    assert data["kwargs"]["api_key"] == {"lc": 1, "type": "secret", "id": ["THAW_AGENTS_API_KEY"]}
    with mock.patch.dict(os.environ, {"THAW_AGENTS_API_KEY": "key-from-env"}):
        loaded = load(
            data, valid_namespaces=["thaw_agents"], allowed_objects=[ChatThaw], secrets_from_env=True
        )
    assert isinstance(loaded, ChatThaw)
    assert loaded.temperature == 0.3 and loaded.max_tokens == 7
    assert loaded.api_key is not None and loaded.api_key.get_secret_value() == "key-from-env"
