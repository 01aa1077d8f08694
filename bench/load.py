"""The load generator: many concurrent streaming clients, in a process of their own.

    python -m bench.load '{"url": "ws://127.0.0.1:8000/v1/stream", "protocol": "ws",
                           "streams": 64, "requests": 4, "max_tokens": 64}'

It connects every client, prints `{"ready": true}`, waits for a line on stdin, runs,
and prints one JSON line of results. Each stream sends its requests one after another
(a WebSocket stream on one connection, continuing its session; an SSE stream as POSTs
of /v1/generate with "stream": true), so `streams` requests are in flight at once.

Latency: TTFT is from sending a request to its first token message. A message that
carries `count` tokens after a gap of g seconds counts as `count` inter-token gaps of
g / count, the way the server's own histogram counts them.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

_decode = msgspec.json.Decoder().decode  # several times faster than json.loads


@dataclass
class LoadSpec:
    url: str  # ws://host:port/v1/stream or http://host:port
    protocol: str = "ws"  # "ws" or "sse"
    streams: int = 1
    requests: int = 1  # per stream, one after another
    max_tokens: int = 64
    prompt: str = "recipe for"
    temperature: float = 1.0
    session_ids: list[str] = field(default_factory=list)  # continue these, one per stream
    reconnect: bool = False  # ws: a fresh connection per request, as most clients do


@dataclass
class StreamRecord:
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)  # request sent -> done received
    connect: list[float] = field(default_factory=list)  # reconnecting: the WebSocket handshake
    tokens: int = 0  # completion_tokens from done events
    received: int = 0  # sum of token-message counts
    messages: int = 0  # token messages
    errors: list[str] = field(default_factory=list)
    finish_reasons: dict[str, int] = field(default_factory=dict)


class _Request:
    """Timing of one generation as its messages arrive."""

    def __init__(self, record: StreamRecord) -> None:
        self.record = record
        self.sent = time.perf_counter()
        self.last: float | None = None
        self.received = 0

    def on_message(self, msg: dict[str, Any]) -> bool:
        """Record one server message; True when the generation is over."""
        now = time.perf_counter()
        kind = msg.get("type")
        record = self.record
        if kind == "token":
            count = int(msg.get("count", 1))
            if self.last is None:
                record.ttft.append(now - self.sent)
            else:
                record.itl.extend([(now - self.last) / count] * count)
            self.last = now
            self.received += count
            record.received += count
            record.messages += 1
        elif kind == "done":
            usage = msg["usage"]["completion_tokens"]
            record.tokens += usage
            record.latency.append(now - self.sent)
            reason = msg.get("finish_reason", "?")
            record.finish_reasons[reason] = record.finish_reasons.get(reason, 0) + 1
            if usage != self.received:
                record.errors.append(f"usage {usage} != tokens received {self.received}")
            return True
        elif kind == "error" or "error" in msg:
            record.errors.append(str(msg.get("code") or msg.get("error")))
            return True
        return False


def _request_body(spec: LoadSpec, session_id: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt": spec.prompt,
        "max_tokens": spec.max_tokens,
        "temperature": spec.temperature,
    }
    if session_id is not None:
        body["session_id"] = session_id
    return body


async def _ws_stream(
    spec: LoadSpec, index: int, go: asyncio.Event, ready: asyncio.Queue[int]
) -> StreamRecord:
    from websockets.asyncio.client import connect

    record = StreamRecord()
    session_id = spec.session_ids[index] if index < len(spec.session_ids) else None

    async def generate(ws: Any, session_id: str | None) -> None:
        body = {"type": "generate", **_request_body(spec, session_id)}
        request = _Request(record)
        await ws.send(json.dumps(body))
        while True:
            msg = _decode(await ws.recv(decode=False))
            if msg.get("type") == "session":
                continue
            if request.on_message(msg):
                return

    if spec.reconnect:  # connect, generate, close: the connection is part of the load
        await ready.put(index)
        await go.wait()
        for _ in range(spec.requests):
            sent = time.perf_counter()
            async with connect(spec.url, compression=None, max_size=None, open_timeout=60) as ws:
                record.connect.append(time.perf_counter() - sent)
                await generate(ws, session_id)
        return record
    async with connect(spec.url, compression=None, max_size=None, open_timeout=60) as ws:
        await ready.put(index)
        await go.wait()
        for _ in range(spec.requests):
            await generate(ws, session_id)
            session_id = None  # the connection continues its own session
    return record


async def _sse_stream(
    spec: LoadSpec, index: int, go: asyncio.Event, ready: asyncio.Queue[int], client: Any
) -> StreamRecord:
    record = StreamRecord()
    session_id = spec.session_ids[index] if index < len(spec.session_ids) else None
    await ready.put(index)
    await go.wait()
    for _ in range(spec.requests):
        request = _Request(record)
        body = {**_request_body(spec, session_id), "stream": True}
        async with client.stream("POST", f"{spec.url}/v1/generate", json=body) as response:
            if response.status_code != 200:
                record.errors.append(f"HTTP {response.status_code}")
                await response.aread()
                continue
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                msg = _decode(line[6:])
                if msg.get("type") == "session":
                    session_id = msg["session_id"]  # continue it with the next request
                    continue
                if request.on_message(msg):
                    break
    return record


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "mean": None, "n": 0}
    array = np.asarray(values)
    return {
        "p50": float(np.percentile(array, 50)),
        "p99": float(np.percentile(array, 99)),
        "mean": float(array.mean()),
        "n": len(values),
    }


async def run_load(spec: LoadSpec, wait_for_go: bool) -> dict[str, Any]:
    go = asyncio.Event()
    ready: asyncio.Queue[int] = asyncio.Queue()
    client = None
    if spec.protocol == "sse":
        import httpx

        limits = httpx.Limits(max_connections=spec.streams, max_keepalive_connections=spec.streams)
        client = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(300.0))
        tasks = [
            asyncio.create_task(_sse_stream(spec, i, go, ready, client))
            for i in range(spec.streams)
        ]
    else:
        tasks = [asyncio.create_task(_ws_stream(spec, i, go, ready)) for i in range(spec.streams)]
    try:
        for _ in range(spec.streams):
            getter = asyncio.ensure_future(ready.get())
            done, _ = await asyncio.wait({getter, *tasks}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                failed = next(t for t in tasks if t.done())
                failed.result()  # raises the connection error
        if wait_for_go:
            print(json.dumps({"ready": True}), flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        started = time.perf_counter()
        go.set()
        records = await asyncio.gather(*tasks)
        wall = time.perf_counter() - started
    finally:
        for task in tasks:
            task.cancel()
        if client is not None:
            await client.aclose()
    merged = StreamRecord()
    for record in records:
        merged.ttft += record.ttft
        merged.itl += record.itl
        merged.latency += record.latency
        merged.connect += record.connect
        merged.tokens += record.tokens
        merged.received += record.received
        merged.messages += record.messages
        merged.errors += record.errors
        for reason, n in record.finish_reasons.items():
            merged.finish_reasons[reason] = merged.finish_reasons.get(reason, 0) + n
    return {
        "protocol": spec.protocol,
        "streams": spec.streams,
        "requests": spec.streams * spec.requests,
        "max_tokens": spec.max_tokens,
        "wall_s": wall,
        "tokens": merged.tokens,
        "tokens_received": merged.received,
        "token_messages": merged.messages,
        "tokens_per_s": merged.tokens / wall if wall > 0 else 0.0,
        "tokens_per_message": merged.received / merged.messages if merged.messages else 0.0,
        "ttft_s": _percentiles(merged.ttft),
        "itl_s": _percentiles(merged.itl),
        "request_latency_s": _percentiles(merged.latency),
        "connect_s": _percentiles(merged.connect),
        "finish_reasons": merged.finish_reasons,
        "errors": merged.errors[:20],
        "error_count": len(merged.errors),
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    spec = LoadSpec(**json.loads(args[0]))
    wait_for_go = "--no-wait" not in args
    try:
        import uvloop

        result = uvloop.run(run_load(spec, wait_for_go))
    except ImportError:
        result = asyncio.run(run_load(spec, wait_for_go))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
