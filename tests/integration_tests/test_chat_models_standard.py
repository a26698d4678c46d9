"""LangChain's standard integration suite for ChatThaw, on the real engine with the default model.

Every ChatThaw built here has the same engine configuration, so the whole suite shares one
``AsyncLLM``. Tests that need more than a 135M model can do are xfailed with that reason
(``helpers.standard``).
"""

from __future__ import annotations

import pytest
from helpers.standard import SmallModelIntegration
from langchain_tests.integration_tests import ChatModelIntegrationTests

pytestmark = pytest.mark.e2e


class TestChatThawIntegration(SmallModelIntegration, ChatModelIntegrationTests):
    """ChatThaw in process (the default model); the suite's own tests, unchanged."""
