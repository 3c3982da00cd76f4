"""A fast synthetic SSE backend, so that the proxy under test is the bottleneck.

Every POST answers with ``events`` SSE events shaped like llama-server's chat
chunks, each in its own write, then ``data: [DONE]``.  GET /health is 200.

    python bench/sse_backend.py PORT [EVENTS]
"""

from __future__ import annotations

import asyncio
import sys

EVENT = (b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"tok"}}],'
         b'"created":1795341112,"id":"chatcmpl-bench","model":"demo","object":"chat.completion.chunk"}\n\n')
CHUNK = b"%x\r\n%s\r\n" % (len(EVENT), EVENT)
DONE = b"data: [DONE]\n\n"
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
TAIL = b"%x\r\n%s\r\n0\r\n\r\n" % (len(DONE), DONE)
HEALTH = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n{"status":"ok"}'


class Stream(asyncio.Protocol):
    def __init__(self, events: int) -> None:
        self.events = events
        self.buffer = b""
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.next_request()

    def next_request(self) -> None:
        if self.busy:
            return
        head_end = self.buffer.find(b"\r\n\r\n")
        if head_end < 0:
            return
        head = self.buffer[:head_end].lower()
        length = 0
        for line in head.split(b"\r\n")[1:]:
            if line.startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        if len(self.buffer) < head_end + 4 + length:
            return
        self.buffer = self.buffer[head_end + 4 + length:]
        if head.startswith(b"get"):
            self.transport.write(HEALTH)
            self.next_request()
        else:
            self.busy = True
            asyncio.get_running_loop().create_task(self.stream())

    async def stream(self) -> None:
        self.transport.write(HEAD)
        for _ in range(self.events):
            if self.transport.is_closing():
                return
            self.transport.write(CHUNK)
            await asyncio.sleep(0)  # one event per write, as a model server sends them
        self.transport.write(TAIL)
        self.busy = False
        self.next_request()


async def main(port: int, events: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Stream(events), "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 200))
