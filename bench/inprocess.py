"""llamad's own CPU per proxied request, without sockets: the gateway between in-memory transports.

    .venv/bin/python bench/inprocess.py [--requests 20000] [--events 200] [--policy]

The client's request bytes go into port 8000's protocol, the request llamad
writes to the child is answered at once with a recorded llama-server response
on a pooled connection, and llamad's answer is thrown away.  What is timed
(``time.process_time``) is llamad's Python code alone: no system calls, no
reactor dispatch, no other process in the measure.  It is a floor, not what a
real request costs.  A shared machine's drift still reaches it (up to 30 %
between runs), so compare two versions of the code in alternating runs.

``--policy`` measures it three ways, alternating: as above; with
auth on and a key of the line format; and with a TOML key that carries every
policy field (a model glob, both token quotas, a rate, max_concurrent, a
priority class), and the access log (its lines gathered as llamad gathers
them; the log thread's writes are not in the measure).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from llamad.keys.access import AccessLog
from llamad.activity import Activity
from llamad.gateway.app import Gateway, api_factory
from llamad.fleet.gate import Gate
from llamad.fleet.runtime import ModelRuntime
from llamad.gateway.guard import Auth
from llamad.gateway.proxy import Proxy
from llamad.gateway.upstream import _Connection
from llamad.metrics import Metrics
from llamad.status import Status
from llamad.supervisor import ExternalBackend

BODY = json.dumps({"prompt": "hello", "max_tokens": 4}).encode()
REQUEST = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY))
STREAM_BODY = json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
STREAM_REQUEST = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(STREAM_BODY), STREAM_BODY))
ANSWER = (b'{"choices":[{"text":"AZgy","index":0,"logprobs":null,"finish_reason":"length"}],"created":1795445310,'
          b'"model":"demo","object":"text_completion","usage":{"completion_tokens":4,"prompt_tokens":4,'
          b'"total_tokens":8},"id":"chatcmpl-jojJfG9MVIQvoEHS0rGbCnp412SSJ3eO"}')
RESPONSE = (b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5, max=100\r\nContent-Type: application/json; charset=utf-8\r\n"
            b"Server: llama.cpp\r\nContent-Length: %d\r\nAccess-Control-Allow-Origin: \r\n\r\n%s"
            % (len(ANSWER), ANSWER))
EVENT = (b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"tok"}}],'
         b'"created":1795341112,"id":"chatcmpl-bench","model":"demo","object":"chat.completion.chunk"}\n\n')
USAGE = (b'data: {"choices":[],"created":1795341112,"id":"chatcmpl-bench","model":"demo",'
         b'"object":"chat.completion.chunk","usage":{"completion_tokens":200,"prompt_tokens":4,"total_tokens":204}}\n\n')
STREAM_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nServer: llama.cpp\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n")
PER_READ = 18  # events per read from the child, as under 8 synthetic streams


KEY = "bench-key-0123456789abcdef"
POLICY_KEYS = f"""[keys.bench]
key = "{KEY}"
models = ["de*"]
rate = 1000000000
tokens_per_minute = 1000000000
tokens_per_day = 1000000000000
max_concurrent = 64
priority = "interactive"
"""


def with_key(request: bytes) -> bytes:
    return request.replace(b"Host: 127.0.0.1:8000\r\n", b"Host: 127.0.0.1:8000\r\nAuthorization: Bearer %s\r\n"
                           % KEY.encode())


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Client(StringTransport):
    """A client connection whose bytes are thrown away."""

    def __init__(self) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def write(self, data: bytes) -> None:
        pass

    def writeSequence(self, seq: list[bytes]) -> None:
        pass


class Child(StringTransport):
    """The pooled connection to the child: each request written to it waits for its answer."""

    def __init__(self, waiting: list[_Connection]) -> None:
        super().__init__()
        self.waiting = waiting

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.waiting.append(self.protocol)


def build(policy: str = "", keys: str = "") -> tuple[object, list[_Connection], Clock]:
    """``policy``: a folder for the keys file (auth on); ``keys``: its text (a TOML key with a policy, and
    the access log; or a key of the line format)."""
    clock = Clock()
    backend = ExternalBackend("http://127.0.0.1:9")
    status = Status(clock, backend, "demo", lazy=False)
    metrics = Metrics(per_key=bool(policy))
    proxy = Proxy(None, clock, 600)
    auth = access = None
    if policy:
        toml = keys.startswith("[")
        path = os.path.join(policy, "keys.toml" if toml else "api_keys.txt")
        with open(path, "w") as f:
            f.write(keys)
        auth = Auth(True, path, False, clock, priorities={"interactive": 1})
        if toml:
            access = AccessLog(clock, lambda data: None)
    activity = Activity(clock)
    runtime = ModelRuntime("demo", backend, Gate(clock, status, backend, 64, 64, 10, metrics), activity)
    gateway = Gateway(clock, status, {runtime.id: runtime}, proxy, metrics, activity, auth, access=access)
    waiting: list[_Connection] = []
    pool = proxy._upstream(backend.target().origin).pool
    for _ in range(2):  # kept alive, as llamad's pool keeps them
        connection = _Connection(pool)
        transport = Child(waiting)
        connection.makeConnection(transport)
        transport.protocol = connection
        pool._idle(connection)
    factory = api_factory(gateway)
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    protocol.makeConnection(Client())
    return protocol, waiting, clock


def run(requests: int, events: int, policy: str = "", keys: str = "") -> tuple[float, float]:
    """Microseconds of CPU per non-streaming request, and per relayed SSE event."""
    protocol, waiting, clock = build(policy, keys)
    request, stream_request = (with_key(REQUEST), with_key(STREAM_REQUEST)) if policy else (REQUEST, STREAM_REQUEST)
    gc.collect()  # what the set-up left does not land in the measure
    started = time.process_time()
    for _ in range(requests):
        protocol.dataReceived(request)
        waiting.pop().dataReceived(RESPONSE)
        clock.advance(1)  # the access log's batches are handed over
    per_request = (time.process_time() - started) / requests * 1e6

    body = [chunk(EVENT)] * events + [chunk(USAGE), chunk(b"data: [DONE]\n\n"), b"0\r\n\r\n"]
    reads = [b"".join(body[i:i + PER_READ]) for i in range(0, len(body), PER_READ)]
    streams = max(200, requests // events)  # a few milliseconds would be at the mercy of one collection
    gc.collect()
    started = time.process_time()
    for _ in range(streams):
        protocol.dataReceived(stream_request)
        connection = waiting.pop()
        connection.dataReceived(STREAM_HEAD)
        for data in reads:
            connection.dataReceived(data)
        clock.advance(1)
    per_event = (time.process_time() - started) / (streams * events) * 1e6
    return per_request, per_event


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--events", type=int, default=200)
    p.add_argument("--policy", action="store_true", help="without keys, with a key, and with a key's whole policy")
    args = p.parse_args()
    if args.policy:
        ways = (("no keys", ""), ("line key", f"bench:{KEY}\n"), ("policy", POLICY_KEYS.lstrip()))
        with tempfile.TemporaryDirectory() as folder:
            for _, keys in ways:
                run(500, args.events, folder if keys else "", keys)  # warm up
            for _ in range(3):
                for name, keys in ways:
                    per_request, per_event = run(args.requests, args.events, folder if keys else "", keys)
                    print(f"{name:<12} {per_request:7.1f} us per request   {per_event:5.2f} us per SSE event")
        return
    run(500, args.events)  # warm up
    per_request, per_event = run(args.requests, args.events)
    print(f"{per_request:7.1f} us per request   {per_event:5.2f} us per SSE event")


if __name__ == "__main__":
    main()
