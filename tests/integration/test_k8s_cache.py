"""The list+watch cache against the fake API server over real HTTP on loopback."""

from __future__ import annotations

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.web.server import Site

from k8s_fake import FakeKube
from llamad.k8s.cache import BACKOFF_INITIAL, BACKOFF_MAX, ListWatchCache
from llamad.k8s.client import ApiStatusError, KubeClient

pytestmark = pytest.mark.integration

DEPLOYMENTS = "apis/apps/v1/deployments"


def deployment(name: str, ns: str = "models", replicas: int = 0) -> dict:
    return {"metadata": {"name": name, "namespace": ns}, "spec": {"replicas": replicas}}


def most_tries_within(seconds: float) -> int:
    """The most list attempts the cache can make in ``seconds``: each retry waits at least half its delay."""
    tries, waited, delay = 1, 0.0, BACKOFF_INITIAL
    while waited + delay / 2 <= seconds:
        tries, waited, delay = tries + 1, waited + delay / 2, min(BACKOFF_MAX, delay * 2)
    return tries


async def until(predicate, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if predicate():
            return
        await deferLater(reactor, 0.02)
    raise AssertionError("condition not reached")


@pytest.fixture
def fake():
    kube = FakeKube()
    port = reactor.listenTCP(0, Site(kube), interface="127.0.0.1")
    kube.url = f"http://127.0.0.1:{port.getHost().port}"
    yield kube
    kube.cut_watches()
    port.stopListening()


def client_for(kube: FakeKube, token: str = "secret-token") -> KubeClient:
    return KubeClient(treq, kube.url, lambda: token)


@pytest_twisted.ensureDeferred
async def test_list_then_watch_sees_every_change(fake):
    fake.put_object(DEPLOYMENTS, deployment("a"))
    cache = ListWatchCache(reactor, client_for(fake), "/apis/apps/v1/namespaces/models/deployments")
    cache.startService()
    try:
        await until(lambda: cache.synced)
        assert list(cache.objects) == [("models", "a")]
        fake.put_object(DEPLOYMENTS, deployment("b"))
        fake.put_object(DEPLOYMENTS, deployment("a", replicas=1))
        fake.put_object(DEPLOYMENTS, deployment("elsewhere", ns="other"))  # another namespace
        await until(lambda: ("models", "b") in cache.objects
                    and cache.objects[("models", "a")]["spec"]["replicas"] == 1)
        fake.delete_object(DEPLOYMENTS, "models", "b")
        await until(lambda: ("models", "b") not in cache.objects)
        assert ("other", "elsewhere") not in cache.objects
        assert cache.lists == 1  # steady state: watches only
    finally:
        cache.stopService()


@pytest_twisted.ensureDeferred
async def test_a_cut_watch_resumes_and_sees_what_changed_meanwhile(fake):
    cache = ListWatchCache(reactor, client_for(fake), "/apis/apps/v1/deployments")
    cache.startService()
    try:
        await until(lambda: cache.synced)
        fake.cut_watches()
        fake.put_object(DEPLOYMENTS, deployment("during-the-cut"))
        await until(lambda: ("models", "during-the-cut") in cache.objects)
        assert cache.lists == 1 and cache.watch_restarts >= 1
    finally:
        cache.stopService()


@pytest_twisted.ensureDeferred
async def test_410_gone_lists_again(fake):
    cache = ListWatchCache(reactor, client_for(fake), "/apis/apps/v1/deployments")
    cache.startService()
    try:
        await until(lambda: cache.synced)
        await until(lambda: fake.watchers)
        cache.stopService()  # away for a while: changes pile up and history is compacted
        fake.cut_watches()
        fake.put_object(DEPLOYMENTS, deployment("new"))
        fake.compact()
        cache.startService()
        await until(lambda: ("models", "new") in cache.objects)
        assert cache.lists == 2
    finally:
        cache.stopService()


@pytest_twisted.ensureDeferred
async def test_a_wrong_token_is_an_error_that_backs_off(fake):
    with pytest.raises(ApiStatusError) as caught:
        await client_for(fake, "wrong").request("GET", "/apis/apps/v1/deployments")
    assert caught.value.code == 401
    cache = ListWatchCache(reactor, client_for(fake, "wrong"), "/apis/apps/v1/deployments")
    started = reactor.seconds()  # the clock the backoff timers run on
    cache.startService()
    try:
        # Retried (the backoff schedule itself is tested on a Clock in tests/unit/test_k8s_cache_clock.py) ...
        await deferLater(reactor, 1.0)  # at least a second: a spinning cache would have made dozens of tries
        await until(lambda: cache.errors >= 3, 30)
        elapsed = reactor.seconds() - started
        assert not cache.synced and cache.lists == 0
        # ... and backing off, not spinning: no more tries than the shortest jittered delays fit in the time that
        # passed (5 in the first second).  A slower machine only lets more time pass, so the bound only gets looser.
        assert cache.errors <= most_tries_within(elapsed), (cache.errors, elapsed)
    finally:
        cache.stopService()


@pytest_twisted.ensureDeferred
async def test_scale_put_with_a_stale_resource_version_is_409(fake):
    fake.put_object(DEPLOYMENTS, deployment("a"))
    api = client_for(fake)
    scale = await api.request("GET", "/apis/apps/v1/namespaces/models/deployments/a/scale")
    fake.put_object(DEPLOYMENTS, deployment("a"))  # someone else wrote meanwhile
    scale["spec"]["replicas"] = 1
    with pytest.raises(ApiStatusError) as caught:
        await api.request("PUT", "/apis/apps/v1/namespaces/models/deployments/a/scale", body=scale)
    assert caught.value.code == 409
    fresh = await api.request("GET", "/apis/apps/v1/namespaces/models/deployments/a/scale")
    fresh["spec"]["replicas"] = 1
    done = await api.request("PUT", "/apis/apps/v1/namespaces/models/deployments/a/scale", body=fresh)
    assert done["spec"]["replicas"] == 1
