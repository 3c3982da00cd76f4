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


@pytest.mark.parametrize("target, action", [
    (b"/slots/0?action=save", True), (b"/slots/3?x=1&action=restore", True), (b"/slots/0?action=erase", True),
    (b"/slots/0", False), (b"/slots", False), (b"/slots?action=save", False), (b"/props?action=save", False),
])
def test_slot_actions_are_told_apart_from_the_slot_list(target, action):
    assert is_slot_action(target.partition(b"?")[0], target) is action


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
