"""LangChain's standard unit suite for ChatThaw: construction, parameters, tool and schema binding.

No engine starts here: ChatThaw builds its engine on the first call, and these tests make none.
"""

from __future__ import annotations

from helpers.standard import ChatThawCapabilities
from langchain_tests.unit_tests import ChatModelUnitTests


class TestChatThawUnit(ChatThawCapabilities, ChatModelUnitTests):
    """ChatThaw in process (the default model); the suite's own tests, unchanged."""
