"""A small, fast, scripted fake of the OpenAI chat-completions HTTP API.

Used by tests (in-process, :class:`FakeOpenAIServer`) and by benchmarks (as a
separate process: ``python -m nimbus.testing.fake_openai --port 0``, or
:func:`spawn_fake_server`). A minimal HTTP/1.1 server on :class:`asyncio.Protocol`
(keep-alive, pipelining, chunked streaming replies), cheap per request.

Scripted behaviour of ``POST /v1/chat/completions``:

* last message has role ``tool`` -> ``"The result is <tool content>."``;
* else a non-empty ``tools`` list (and ``tool_calls`` enabled) -> one call to
  the first tool with the configured ``tool_arguments``;
* else -> ``"Echo: <last user message>"``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from http import HTTPStatus
from pathlib import Path
from typing import Any, cast

import orjson

__all__ = ["ECHO_REQUEST", "MODEL_ID", "FakeOpenAIServer", "Fault", "main", "spawn_fake_server"]

MODEL_ID = "fake-model"
"""The single model listed by ``GET /v1/models``."""

Fault = tuple[int, Mapping[str, str], Any]
"""An injected reply: ``(status, extra headers, body)``; body is JSON-able, bytes, str, None
(an OpenAI error body) or :data:`ECHO_REQUEST`."""


class _EchoRequest:
    def __repr__(self) -> str:
        return "ECHO_REQUEST"


ECHO_REQUEST: Any = _EchoRequest()
"""A fault body: an OpenAI error body whose message echoes the request's line and headers
(``Authorization`` included), as some proxies and misconfigured servers do."""

_MAX_HEAD = 64 * 1024
_CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
_MODEL_PATHS = frozenset({"/v1/models", "/models"})
_JSON = "application/json"
_MODELS_BODY = orjson.dumps(
    {
        "object": "list",
        "data": [{"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "nimbus"}],
    }
)
_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
)
_Obj = dict[str, Any]
_Reply = tuple[bytes, float, bool]  # (response bytes, delay before sending, close afterwards)


class _BadRequest(Exception):
    """A request the server rejects with ``400``."""


def _response(
    status: int, body: bytes, ctype: str = _JSON, headers: Mapping[str, str] | None = None
) -> bytes:
    """Serialise one complete HTTP/1.1 response with a ``Content-Length`` body."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items()) if headers else ""
    head = f"HTTP/1.1 {status} {phrase}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
    return (head + extra + "\r\n").encode("latin-1") + body


def _error(status: int, msg: str, kind: str = "invalid_request_error", **headers: str) -> bytes:
    """An OpenAI-style JSON error response."""
    body = {"error": {"message": msg, "type": kind, "param": None, "code": None}}
    return _response(status, orjson.dumps(body), headers=headers)


def _text(content: Any) -> str:
    """The text of a message ``content`` (a string or a list of content parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _sse(payload: bytes) -> bytes:
    """One server-sent event carrying ``payload``, framed as one HTTP chunk."""
    data = b"data: " + payload + b"\n\n"
    return b"%x\r\n%b\r\n" % (len(data), data)


class FakeOpenAIServer:
    """In-process fake OpenAI server; see the module docstring for its script.

    Attributes: ``requests`` (parsed chat request bodies, in arrival order, when
    ``record`` is on), ``request_count`` (every chat request received),
    ``connections_accepted`` and ``faults`` (a deque of pending :data:`Fault`,
    consumed one per chat request; append to it at any time).
    """

    def __init__(
        self,
        *,
        latency: float = 0.0,
        tool_arguments: str = "{}",
        tool_calls: bool = True,
        record: bool = True,
        faults: Iterable[Fault] | None = None,
    ) -> None:
        orjson.loads(tool_arguments)  # must be a JSON document, like real tool-call arguments
        self.latency = float(latency)
        self.tool_arguments = tool_arguments
        self.tool_calls = tool_calls
        self.record = record
        self.faults: deque[Fault] = deque(faults or ())
        self.requests: list[Any] = []
        self.request_count = 0
        self.connections_accepted = 0
        self.host, self.port = "127.0.0.1", 0
        self._counter = 0
        self._server: asyncio.Server | None = None
        self._conns: set[_Connection] = set()

    @property
    def base_url(self) -> str:
        """The OpenAI ``base_url`` of this server, e.g. ``http://127.0.0.1:PORT/v1``."""
        return f"http://{self.host}:{self.port}/v1"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> FakeOpenAIServer:
        """Start listening (``port=0`` picks a free port) and return ``self``."""
        loop = asyncio.get_running_loop()
        # A deep accept queue: benches open thousands of connections at once, and a full
        # queue drops connection attempts (the client retries a second or more later).
        self._server = await loop.create_server(lambda: _Connection(self), host, port, backlog=4096)
        self.host, self.port = host, self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Stop listening and close every open connection."""
        if self._server is None:
            return
        self._server.close()
        for conn in list(self._conns):
            conn.abort()
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> FakeOpenAIServer:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def dispatch(
        self, method: str, path: str, body: bytes, head: Sequence[str] = ()
    ) -> tuple[bytes, float]:
        """Route one request (``head``: its request line and header lines, for
        :data:`ECHO_REQUEST`); return the whole response and the delay before sending it."""
        path = path.partition("?")[0]
        if path in _MODEL_PATHS and method == "GET":
            return _response(200, _MODELS_BODY), 0.0
        if path in _CHAT_PATHS and method == "POST":
            self.request_count += 1
            try:
                req = orjson.loads(body)
            except orjson.JSONDecodeError:
                return _error(400, "We could not parse the JSON body of your request."), 0.0
            if self.record:
                self.requests.append(req)
            if self.faults:
                return self._fault(*self.faults.popleft(), request_head=head), 0.0
            try:
                return self._chat(req), self.latency
            except _BadRequest as exc:
                return _error(400, str(exc)), 0.0
        if path in _MODEL_PATHS or path in _CHAT_PATHS:
            return _error(405, f"Method {method} not allowed on {path}"), 0.0
        return _error(404, f"Unknown path: {method} {path}"), 0.0

    @staticmethod
    def _fault(
        status: int, headers: Mapping[str, str], body: Any, request_head: Sequence[str] = ()
    ) -> bytes:
        """Serialise an injected fault reply."""
        if body is None:
            return _error(status, f"Injected fault {status}", "server_error", **headers)
        if body is ECHO_REQUEST:
            message = f"Injected fault {status}; the request was: {' | '.join(request_head)}"
            return _error(status, message, "server_error", **headers)
        if isinstance(body, str):
            body = body.encode()
        elif not isinstance(body, bytes | bytearray):
            body = orjson.dumps(body)
        ctype = next((v for k, v in headers.items() if k.lower() == "content-type"), _JSON)
        rest = {k: v for k, v in headers.items() if k.lower() != "content-type"}
        return _response(status, bytes(body), ctype, rest)

    def _chat(self, req: Any) -> bytes:
        """Build the scripted reply (whole response bytes) for a chat request."""
        if not isinstance(req, dict):
            raise _BadRequest("The request body must be a JSON object.")
        model, messages, tools = req.get("model"), req.get("messages"), req.get("tools") or []
        if not isinstance(model, str):
            raise _BadRequest("You must provide a model parameter.")
        if not isinstance(messages, list) or not messages:
            raise _BadRequest("'messages' must be a non-empty array.")
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise _BadRequest("Every message must be an object with a string 'role'.")
        if not isinstance(tools, list):
            raise _BadRequest("'tools' must be an array.")
        self._counter += 1
        n, args, last = self._counter, self.tool_arguments, messages[-1]
        content: str | None = None
        call: _Obj | None = None
        if last["role"] == "tool":
            content = text = f"The result is {_text(last.get('content'))}."
        elif tools and self.tool_calls:
            try:
                name = tools[0]["function"]["name"]
            except (KeyError, TypeError):
                name = None
            if not isinstance(name, str):
                raise _BadRequest("tools[0].function.name must be a string.")
            call = {"id": f"call_{n}", "type": "function", "function": {"name": name}}
            text = name + args
        else:
            user = next((m for m in reversed(messages) if m["role"] == "user"), None)
            content = text = f"Echo: {_text(user and user.get('content'))}"
        prompt = sum(len(_text(m.get("content"))) for m in messages) // 4 + 1
        out = len(text) // 4 + 1
        usage = {"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out}
        head: _Obj = {"id": f"chatcmpl-fake{n}", "object": "chat.completion", "created": 0}
        head.update(created=int(time.time()), model=model)
        finish = "stop" if call is None else "tool_calls"
        if req.get("stream") is True:
            opts = req.get("stream_options")
            with_usage = isinstance(opts, dict) and opts.get("include_usage") is True
            return self._stream(head, content, call, finish, usage if with_usage else None)
        message: _Obj = {"role": "assistant", "content": content, "refusal": None}
        if call is not None:
            call["function"]["arguments"] = args
            message["tool_calls"] = [call]
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        body = {**head, "choices": [choice], "usage": usage}
        return _response(200, orjson.dumps(body))

    def _stream(
        self, head: _Obj, content: str | None, call: _Obj | None, finish: str, usage: _Obj | None
    ) -> bytes:
        """Build a whole chunked ``text/event-stream`` response of chunk objects."""
        # Serialise the fixed part of every chunk once; only the choice differs.
        prefix = orjson.dumps({**head, "object": "chat.completion.chunk"})[:-1] + b',"choices":['
        suffix = b"]}" if usage is None else b'],"usage":null}'

        def chunk(delta: _Obj, reason: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            return _sse(prefix + orjson.dumps(choice) + suffix)

        parts = [_STREAM_HEAD, chunk({"role": "assistant", "content": ""})]
        if call is not None:
            args, half = self.tool_arguments, len(self.tool_arguments) // 2
            first = {**call, "index": 0, "function": {**call["function"], "arguments": ""}}
            parts.append(chunk({"tool_calls": [first]}))
            for piece in (args[:half], args[half:]):
                if piece:
                    delta = {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}
                    parts.append(chunk(delta))
        else:
            words = (content or "").split(" ")
            pieces = [w + " " for w in words[:-1]] + words[-1:]
            parts.extend(chunk({"content": p}) for p in pieces if p)
        parts.append(chunk({}, finish))
        if usage is not None:
            parts.append(_sse(prefix + b'],"usage":' + orjson.dumps(usage) + b"}"))
        parts.append(_sse(b"[DONE]") + b"0\r\n\r\n")
        return b"".join(parts)


class _Connection(asyncio.Protocol):
    """One client connection: buffers bytes, parses requests, writes replies in order."""

    def __init__(self, server: FakeOpenAIServer) -> None:
        self._srv = server
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self._queue: deque[_Reply] = deque()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._srv.connections_accepted += 1
        self._srv._conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._srv._conns.discard(self)
        self._closing = True
        if self._task is not None:
            self._task.cancel()

    def abort(self) -> None:
        """Drop the connection at once (server shutdown)."""
        if self._transport is not None:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        while buf and not self._closing:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _MAX_HEAD:
                    self._send(_error(431, "Request headers too large"), 0.0, True)
                return
            lines = buf[:end].decode("latin-1").split("\r\n")
            request_line = lines[0].split(" ")
            if len(request_line) != 3 or not request_line[2].startswith("HTTP/1."):
                self._send(_error(400, "Malformed request line"), 0.0, True)
                return
            length, close = 0, request_line[2] == "HTTP/1.0"
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value) if value.strip().isdigit() else -1
                elif name == "connection":
                    token = value.strip().lower()
                    close = token == "close" or (close and token != "keep-alive")
                elif name == "transfer-encoding":
                    length = -2
            if length < 0:
                msg = "Bad Content-Length" if length == -1 else "Send bodies with Content-Length"
                self._send(_error(400, msg), 0.0, True)
                return
            total = end + 4 + length
            if len(buf) < total:
                return
            body = bytes(buf[end + 4 : total])
            del buf[:total]
            resp, delay = self._srv.dispatch(request_line[0], request_line[1], body, lines)
            self._send(resp, delay, close)

    def _send(self, resp: bytes, delay: float, close: bool) -> None:
        """Write ``resp`` now, or queue it behind earlier or delayed replies."""
        if close:
            self._closing = True
            head, sep, rest = resp.partition(b"\r\n\r\n")
            resp = head + b"\r\nConnection: close" + sep + rest
        if delay <= 0 and not self._queue and self._transport is not None:
            self._transport.write(resp)
            if close:
                self._transport.close()
            return
        self._queue.append((resp, delay, close))
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        """Send queued replies in order, sleeping each one's delay first."""
        queue, transport = self._queue, self._transport
        assert transport is not None
        try:
            while queue:
                resp, delay, close = queue[0]
                if delay > 0:
                    await asyncio.sleep(delay)
                queue.popleft()
                if transport.is_closing():
                    return
                transport.write(resp)
                if close:
                    transport.close()
                    return
        finally:
            self._task = None


def spawn_fake_server(
    latency_s: float,
    tool_arguments: str = "{}",
    cpu: int | None = None,
    *,
    tool_calls: bool = True,
    timeout: float = 15.0,
) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``python -m nimbus.testing.fake_openai`` on a free port; wait for ``READY``.

    Returns ``(process, base_url)``. The caller owns the process: ``terminate()``
    then ``wait()`` (it exits with code 0 on SIGTERM). Raises :class:`RuntimeError`
    (with the child's stderr) if it exits or stays silent for ``timeout`` seconds.
    """
    cmd = [sys.executable, "-m", "nimbus.testing.fake_openai", "--port", "0"]
    cmd += ["--latency-ms", repr(latency_s * 1000.0), "--tool-arguments", tool_arguments]
    if cpu is not None:
        cmd += ["--cpu", str(cpu)]
    if not tool_calls:
        cmd.append("--no-tool-calls")
    src = str(Path(__file__).resolve().parents[2])  # so the child imports this very package
    paths = [src, os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env)
        assert proc.stdout is not None
        fd, line, deadline = proc.stdout.fileno(), b"", time.monotonic() + timeout
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            ready = select.select([fd], [], [], max(left, 0.0))[0] if left > 0 else []
            chunk = os.read(fd, 256) if ready else b""
            if not chunk:
                if not ready:
                    proc.kill()
                why = f"exited with code {proc.wait()}" if ready else f"timed out after {timeout}s"
                proc.stdout.close()
                err.seek(0)
                stderr = err.read().decode(errors="replace").strip()
                raise RuntimeError(f"fake OpenAI server {why} before READY: {stderr}")
            line += chunk
    proc.stdout.close()  # the server prints nothing after READY
    word, _, port = line.decode().strip().partition(" ")
    if word != "READY" or not port.isdigit():
        proc.kill()
        proc.wait()
        raise RuntimeError(f"fake OpenAI server printed {line!r} instead of 'READY <port>'")
    return proc, f"http://127.0.0.1:{port}/v1"


async def _serve(args: argparse.Namespace) -> int:
    """Run the server until SIGTERM/SIGINT."""
    server = FakeOpenAIServer(
        latency=args.latency_ms / 1000.0,
        tool_arguments=args.tool_arguments,
        tool_calls=not args.no_tool_calls,
        record=False,
    )
    await server.start(args.host, args.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sys.stdout.write(f"READY {server.port}\n")
    sys.stdout.flush()
    await stop.wait()
    await server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: ``python -m nimbus.testing.fake_openai --port P ...``."""
    parser = argparse.ArgumentParser(prog="python -m nimbus.testing.fake_openai")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--tool-arguments", default="{}")
    parser.add_argument("--cpu", type=int, default=None, help="pin the process to this CPU")
    parser.add_argument("--no-tool-calls", action="store_true")
    args = parser.parse_args(argv)
    try:
        orjson.loads(args.tool_arguments)
    except orjson.JSONDecodeError:
        parser.error(f"--tool-arguments is not valid JSON: {args.tool_arguments!r}")
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    loop_factory = None
    with contextlib.suppress(ImportError):
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(_serve(args))


if __name__ == "__main__":
    sys.exit(main())
