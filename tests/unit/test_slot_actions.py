"""Slot save, restore and erase read and write llamad's KV cache files: only an admin (or loopback) reaches them."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from wire import build, json_of

from llamad.gateway.front import FrontRequest
from llamad.gateway.guard import Auth, is_slot_action

INFERENCE, ADMIN = "i" * 24, "a" * 24
KEYS = f"""
[keys.user]
key = "{INFERENCE}"
role = "inference"

[keys.ops]
key = "{ADMIN}"
role = "admin"
"""


def bearer(key: str) -> dict:
    return {"authorization": [f"Bearer {key}"]}


@pytest.fixture
def remote_client(monkeypatch):
    monkeypatch.setattr(FrontRequest, "getClientAddress", lambda self: IPv4Address("TCP", "10.1.2.3", 40000))


@pytest.mark.parametrize("path, action", [
    (b"/slots/0", True), (b"/slots/3", True), (b"/upstream/alpha/slots/0", True),
    (b"/slots", False), (b"/upstream/alpha/slots", False), (b"/props", False), (b"/v1/slots/0", False),
])
def test_every_path_under_slots_is_a_slot_action(path, action):
    assert is_slot_action(path) is action


@pytest.mark.parametrize("query", ["action=save", "%61ction=save", "x=1&action=restore", "action=erase", ""])
@pytest_twisted.ensureDeferred
async def test_no_spelling_of_the_query_lets_an_inference_key_reach_a_slot(tmp_path, query):
    keys = tmp_path / "api_keys.toml"
    keys.write_text(KEYS)
    http, clock, backend, status, metrics, proxy = build(auth=Auth(True, str(keys), False, Clock()))
    for path in ("/slots/0", "/upstream/demo/slots/0"):
        response = await http.post(f"http://x{path}?{query}", json={"filename": "x.bin"}, headers=bearer(INFERENCE))
        assert response.code == 403, (path, query)
    assert proxy.targets == []


@pytest.mark.parametrize("action", ["save", "restore", "erase"])
@pytest_twisted.ensureDeferred
async def test_with_auth_on_only_an_admin_key_reaches_a_slot_action(tmp_path, action):
    keys = tmp_path / "api_keys.toml"
    keys.write_text(KEYS)
    http, clock, backend, status, metrics, proxy = build(auth=Auth(True, str(keys), False, Clock()))
    url = f"http://x/slots/0?action={action}"
    response = await http.post(url, json={"filename": "x.bin"}, headers=bearer(INFERENCE))
    assert response.code == 403 and (await json_of(response))["error"]["code"] == "insufficient_role"
    assert proxy.targets == []
    assert (await http.get("http://x/slots", headers=bearer(INFERENCE))).code == 200  # the list stays theirs
    assert (await http.post(url, json={"filename": "x.bin"}, headers=bearer(ADMIN))).code == 200
    assert len(proxy.targets) == 2


@pytest_twisted.ensureDeferred
async def test_with_auth_off_a_slot_action_answers_loopback_only(tmp_path, remote_client):
    http, clock, backend, status, metrics, proxy = build()
    response = await http.post("http://x/slots/0?action=save", json={"filename": "x.bin"})
    body = await json_of(response)
    assert response.code == 403 and body["error"]["code"] == "forbidden" and "admin" in body["error"]["message"]
    assert proxy.targets == []
    assert (await http.get("http://x/slots")).code == 200


@pytest_twisted.ensureDeferred
async def test_with_auth_off_loopback_reaches_a_slot_action(tmp_path):
    http, clock, backend, status, metrics, proxy = build()
    assert (await http.post("http://x/slots/0?action=save", json={"filename": "x.bin"})).code == 200
    assert len(proxy.targets) == 1
