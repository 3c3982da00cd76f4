"""backend.kind = "llama-cpp-python": llamad supervises `python -m llama_cpp.server` on the demo model."""

from __future__ import annotations

import importlib.util
import signal
import sys

import openai
import pytest

from helpers import alive

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def needs_llama_cpp_python():
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.fail("llama-cpp-python is not installed: `make test` installs the [llama-cpp-python] extra")


def test_llama_cpp_python_backend_serves_through_llamad(start_llamad):
    # PORT is llamad's API port in the child's inherited environment; the child must not take it.
    daemon = start_llamad({"kind": "llama-cpp-python", "command": sys.executable, "context": 512})
    api = openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="ignored", max_retries=0)
    assert [m.id for m in api.models.list().data] == ["demo"]
    chat = api.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert chat.usage.completion_tokens >= 1
    text = "".join(c.choices[0].text for c in api.completions.create(
        model="demo", prompt="Hello", max_tokens=6, stream=True) if c.choices)
    assert text
    # The per-boot key reaches the child through its environment, never argv.
    pid = daemon.backend_pid()
    cmdline = open(f"/proc/{pid}/cmdline").read()
    assert "llama_cpp.server" in cmdline and "api_key" not in cmdline and "api-key" not in cmdline
    assert daemon.stop(signal.SIGTERM) == 0
    assert not alive(pid)
