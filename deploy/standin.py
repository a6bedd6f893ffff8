"""A local stand-in for webhook.site: answers like the real notification service, remembers what it got.

    python deploy/standin.py                # listens on 127.0.0.1:8081 (STANDIN_HOST / STANDIN_PORT)

``POST`` to any path but ``/_control/...`` is a notification: the answer is ``202`` with
``{"message": "Accepted", "messageId": "<uuid>"}``. It can be told to misbehave, for a share of
requests, through the environment at start (``STANDIN_DELAY_MS``, ``STANDIN_FAIL_RATE``,
``STANDIN_FAIL_STATUS``, ``STANDIN_TIMEOUT_RATE``, ``STANDIN_AUTH_KEY``) or at run time:

- ``POST /_control/behaviour`` JSON, any of: ``delay_ms``, ``delay_rate``, ``fail_rate``, ``fail_status``,
  ``retry_after`` (seconds, sent with failures), ``timeout_rate`` (hold the request for ``hang_seconds``),
  ``no_message_id_rate`` (202 without ``messageId``), ``garbage_rate`` (202 with a non-JSON body),
  ``script`` (a list of answers served first, in order, e.g. ``[{"status": 500}, {"status": 202}]``;
  an answer may carry ``delay_ms``, ``retry_after``, ``body``, ``hang``, ``reset`` (drop the connection
  with a TCP reset instead of answering), ``location`` (a ``Location`` header, for redirects),
  ``huge`` (a body of that many bytes), ``headers`` (extra response headers, any values), ``chunks`` (a body
  written piece by piece: ``[[delay_ms, text], ...]``, chunked)), ``mix`` (a list of ``[weight, answer]``
  pairs: when no script is left, each request draws one of these answers at random instead of the rates above).
- ``GET /_control/received`` (``?keys=1`` for just the Idempotency-Keys; a signed request also keeps its raw
  body and its ``webhook-*`` headers), ``GET /_control/stats``,
  ``POST /_control/reset``, ``GET /_control/health``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import socket
import struct
import time
import uuid
from typing import Any

import orjson
from aiohttp import web

DEFAULTS: dict[str, Any] = {
    "delay_ms": 0,
    "delay_rate": 1.0,
    "fail_rate": 0.0,
    "fail_status": 500,
    "retry_after": None,
    "timeout_rate": 0.0,
    "hang_seconds": 3600,
    "no_message_id_rate": 0.0,
    "garbage_rate": 0.0,
    "auth_key": "",
    "mix": None,
}


SIGNING_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")


class StandIn:
    def __init__(self, behaviour: dict[str, Any] | None = None) -> None:
        self.behaviour = {**DEFAULTS, **(behaviour or {})}
        self.script: collections.deque[dict[str, Any]] = collections.deque()
        self.reset()

    def reset(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.by_key: collections.Counter[str] = collections.Counter()
        self.answered: collections.Counter[int] = collections.Counter()
        self.started = time.time()

    def _json(self, data: Any, status: int = 200) -> web.Response:
        return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")

    async def notify(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        b = self.behaviour
        if b["auth_key"] and request.headers.get("x-ins-auth-key") != b["auth_key"]:
            return self._json({"message": "Unauthorized"}, 401)
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError:
            payload = None
        key = request.headers.get("Idempotency-Key", "")
        answer = self.script.popleft() if self.script else self._draw()
        status = int(answer.get("status", 202))
        message_id = str(uuid.uuid4())
        # Recorded on arrival: a request whose client gave up (timeout, crash) still reached the service.
        record = {
            "key": key,
            "body": payload,
            "status": None,
            "messageId": message_id,
            "auth": request.headers.get("x-ins-auth-key"),
            "traceparent": request.headers.get("traceparent"),  # W3C trace context (the services' tracing)
            "at": time.time(),
        }
        if "webhook-signature" in request.headers:  # signed: keep what a verifier needs (exact bytes)
            record["raw"] = raw.decode("utf-8", "replace")
            record["signing"] = {h: request.headers.get(h, "") for h in SIGNING_HEADERS}
        self.received.append(record)
        self.by_key[key] += 1
        if answer.get("delay_ms"):
            await asyncio.sleep(answer["delay_ms"] / 1000)
        if answer.get("hang"):
            await asyncio.sleep(b["hang_seconds"])
        if answer.get("reset"):
            record["status"] = "reset"
            return self._reset(request)
        record["status"] = status
        self.answered[status] += 1
        headers = {str(k): str(v) for k, v in (answer.get("headers") or {}).items()}
        if answer.get("retry_after") is not None:
            headers["Retry-After"] = str(answer["retry_after"])
        if answer.get("location"):
            headers["Location"] = str(answer["location"])
        if answer.get("huge"):
            return await self._huge(request, status, headers, int(answer["huge"]), message_id)
        if answer.get("chunks") is not None:
            return await self._chunked(request, status, headers, answer["chunks"], message_id)
        if "body" in answer:
            body = answer["body"]
            data = body.encode() if isinstance(body, str) else orjson.dumps(body)
            return web.Response(body=data, status=status, headers=headers, content_type="application/json")
        if status == 202:
            return self._json({"message": "Accepted", "messageId": message_id}, 202)
        return web.Response(
            body=orjson.dumps({"message": "Error"}), status=status, headers=headers, content_type="application/json"
        )

    @staticmethod
    def _reset(request: web.Request) -> web.Response:
        """Drop the connection with a TCP RST (SO_LINGER 0), as a crashing or hostile server would."""
        transport = request.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        return web.Response(status=500)  # never reaches the client

    @staticmethod
    async def _huge(
        request: web.Request, status: int, headers: dict[str, str], size: int, message_id: str
    ) -> web.StreamResponse:
        """A body of ``size`` bytes, streamed: valid JSON at the start, then padding that never ends it."""
        resp = web.StreamResponse(status=status, headers={**headers, "Content-Type": "application/json"})
        resp.content_length = size
        head = orjson.dumps({"message": "Accepted", "messageId": message_id})[:-1] + b', "padding": "'
        chunk = b"x" * 65536
        try:
            await resp.prepare(request)
            await resp.write(head[:size])
            left = size - min(size, len(head))
            while left > 0:
                await resp.write(chunk[: min(left, len(chunk))])
                left -= min(left, len(chunk))
            await resp.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the client read what it wanted and hung up
        return resp

    @staticmethod
    async def _chunked(
        request: web.Request, status: int, headers: dict[str, str], chunks: list[Any], message_id: str
    ) -> web.StreamResponse:
        """A body in pieces, each after its delay (``{messageId}`` in a piece is replaced by the message id)."""
        resp = web.StreamResponse(status=status, headers={**headers, "Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        try:
            await resp.prepare(request)
            for delay_ms, text in chunks:
                await asyncio.sleep(float(delay_ms) / 1000)
                await resp.write(str(text).replace("{messageId}", message_id).encode())
            await resp.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the client gave up
        return resp

    def _draw(self) -> dict[str, Any]:
        b = self.behaviour
        if b["mix"]:
            weights = [float(w) for w, _ in b["mix"]]
            return dict(random.choices([a for _, a in b["mix"]], weights)[0])
        answer: dict[str, Any] = {}
        if b["delay_ms"] and random.random() < b["delay_rate"]:
            answer["delay_ms"] = b["delay_ms"]
        if random.random() < b["timeout_rate"]:
            answer["hang"] = True
        elif random.random() < b["fail_rate"]:
            answer["status"] = b["fail_status"]
            if b["retry_after"] is not None:
                answer["retry_after"] = b["retry_after"]
        elif random.random() < b["no_message_id_rate"]:
            answer["body"] = {"message": "Accepted"}
        elif random.random() < b["garbage_rate"]:
            answer["body"] = "<html>not json</html>"
        return answer

    async def set_behaviour(self, request: web.Request) -> web.Response:
        try:
            data = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return self._json({"error": "body must be JSON"}, 400)
        unknown = set(data) - set(DEFAULTS) - {"script"}
        if unknown:
            return self._json({"error": f"unknown fields: {sorted(unknown)}"}, 400)
        self.script = collections.deque(data.pop("script", []) or [])
        self.behaviour.update(data)
        return self._json({"behaviour": self.behaviour, "script": list(self.script)})

    async def received_list(self, request: web.Request) -> web.Response:
        if request.query.get("keys"):
            return self._json([r["key"] for r in self.received])
        return self._json(self.received)

    async def stats(self, request: web.Request) -> web.Response:
        dupes = {k: n for k, n in self.by_key.items() if n > 1}
        return self._json(
            {
                "received": len(self.received),
                "distinct_keys": len(self.by_key),
                "duplicates": dupes,
                "answered": {str(k): v for k, v in self.answered.items()},
            }
        )

    async def reset_view(self, request: web.Request) -> web.Response:
        self.reset()
        self.script.clear()
        self.behaviour = {**DEFAULTS, "auth_key": self.behaviour["auth_key"]}
        return self._json({"reset": True})

    async def health(self, request: web.Request) -> web.Response:
        return self._json({"status": "ok"})


def create_app(behaviour: dict[str, Any] | None = None) -> web.Application:
    standin = StandIn(behaviour)
    app = web.Application(client_max_size=4 * 1024 * 1024)
    app.router.add_post("/_control/behaviour", standin.set_behaviour)
    app.router.add_post("/_control/reset", standin.reset_view)
    app.router.add_get("/_control/received", standin.received_list, allow_head=False)
    app.router.add_get("/_control/stats", standin.stats, allow_head=False)
    app.router.add_get("/_control/health", standin.health, allow_head=False)
    app.router.add_post("/{tail:.*}", standin.notify)
    return app


def behaviour_from_env(env: dict[str, str] | os._Environ[str] = os.environ) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, cast in (
        ("delay_ms", float),
        ("fail_rate", float),
        ("fail_status", int),
        ("timeout_rate", float),
        ("auth_key", str),
    ):
        raw = env.get(f"STANDIN_{name.upper()}")
        if raw is not None:
            out[name] = cast(raw)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="local stand-in for webhook.site")
    parser.add_argument("--host", default=os.environ.get("STANDIN_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("STANDIN_PORT", "8081")))
    args = parser.parse_args()
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    print(f"webhook stand-in listening on http://{args.host}:{args.port}/webhook", flush=True)
    web.run_app(
        create_app(behaviour_from_env()), host=args.host, port=args.port, print=None, access_log=None, loop=loop
    )


if __name__ == "__main__":
    main()
