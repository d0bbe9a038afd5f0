"""The ASGI app: routers, error mapping, limits, logging and metrics, and the lifespan that
opens the database, applies migrations, bootstraps the admin key and runs the worker pool."""

from __future__ import annotations

import asyncio
import gc
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
import structlog
from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nimbus import __version__
from nimbus.adapters.api import errors
from nimbus.adapters.api.deps import Services
from nimbus.adapters.api.routes import assistants, openai, runs, store, system, threads
from nimbus.adapters.api.streams import TenantStreams
from nimbus.adapters.bus import open_bus
from nimbus.adapters.llm import ModelCatalog
from nimbus.adapters.store.database import Database
from nimbus.adapters.store.keys import OPERATOR_TENANT
from nimbus.adapters.tools.builtin import builtin_tools
from nimbus.exceptions import ConfigError
from nimbus.service.agents import AgentFactory
from nimbus.service.broker import RunBroker
from nimbus.service.feed import FeedFollower
from nimbus.service.metrics import METRICS
from nimbus.service.pool import worker_pool
from nimbus.service.runs import RunService
from nimbus.settings import Settings

log = structlog.get_logger("nimbus.adapters.api")
JSON_METHODS = {b"POST", b"PUT", b"PATCH", b"DELETE"}
GC_YOUNG_THRESHOLD = 10_000  # allocations between young collections (Python's default: 700)


def _problem(status: int, message: str) -> list[Message]:
    body = orjson.dumps({"detail": message, "status": status})
    return [
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        },
        {"type": "http.response.body", "body": body},
    ]


class Guard:
    """Request ids, access logs, metrics, body-size limit (413, with or without a
    Content-Length), body time limit (408), content type (415) and URLs no database can
    compare (NUL: 400).

    Pure ASGI, so streaming responses pass through untouched.
    """

    def __init__(self, app: ASGIApp, max_body: int, body_timeout_s: float) -> None:
        self.app = app
        self.max_body = max_body
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or uuid.uuid4().hex
        method: str = scope["method"]
        started = time.perf_counter()
        status_holder = {"status": 500, "started": 0}
        body_late = False

        async def send_wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                status_holder["started"] = 1
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
                if body_late:  # the rest of the body may yet come, where a next request would
                    message["headers"].append((b"connection", b"close"))
            await send(message)

        async def reject(status: int, text: str) -> None:
            for message in _problem(status, text):
                await send_wrapped(message)

        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await reject(413, f"request body over the {self.max_body}-byte limit")
            return
        has_body = length not in (None, b"0") or b"transfer-encoding" in headers
        if method.encode() in JSON_METHODS and has_body:
            ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if ctype != b"application/json" and not ctype.endswith(b"+json"):
                await reject(415, "send JSON with Content-Type: application/json")
                return
        if "\x00" in scope["path"] or b"%00" in scope["query_string"].lower():
            await reject(400, "the URL may not contain NUL (%00) characters")
            return
        seen = 0
        body_done = False
        body_deadline = asyncio.get_running_loop().time() + self.body_timeout_s

        async def receive_limited() -> Message:
            nonlocal seen, body_done, body_late
            if body_done:  # from now on receive() only tells of a disconnect: no deadline
                return await receive()
            try:
                async with asyncio.timeout_at(body_deadline):
                    message = await receive()
            except TimeoutError:
                body_late = True
                raise _BodyRefused(
                    408, f"request body not received within {self.body_timeout_s:g} s"
                ) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise _BodyRefused(413, f"request body over the {self.max_body}-byte limit")
                body_done = not message.get("more_body", False)
            else:
                body_done = True
            return message

        structlog.contextvars.bind_contextvars(request_id=request_id)
        try:
            await self.app(scope, receive_limited, send_wrapped)
        except _BodyRefused as exc:  # raised where no handler rendered it
            if status_holder["started"]:
                raise
            await reject(exc.status_code, str(exc.detail))
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            elapsed = time.perf_counter() - started
            METRICS.of(METRICS.http_requests, method, path, str(status_holder["status"])).inc()
            METRICS.of(METRICS.http_seconds, method, path).observe(elapsed)
            state = scope.get("state") or {}
            log.info(
                "http.request",
                method=method,
                path=path,
                status=status_holder["status"],
                ms=round(elapsed * 1000, 2),
                tenant=state.get("tenant"),
            )
            structlog.contextvars.unbind_contextvars("request_id")


class _BodyRefused(HTTPException):
    """The body grew past the limit (413) or came too slowly (408) while it was read: an
    HTTPException, so that FastAPI's body parsing lets it through to the error handlers (a
    413 or 408, not a 400)."""


def _tune_gc() -> None:
    """What is loaded by now (modules, the app, the stores) lives as long as the process:
    freeze it out of the cyclic garbage collector, whose full passes otherwise rescan it all
    (measured: a fifth of the server's CPU under load), and let young objects accumulate
    longer between collections (a request allocates thousands, nearly all freed at once)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)


async def _admin_key(
    settings: Settings, db: Database, on_admin_key: Callable[[str | None], None] | None
) -> None:
    """The operator's admin key, on the database as the server opened it: ``NIMBUS_ADMIN_KEY``
    stored if set; else, with ``on_admin_key``, a new key when the operator tenant has no
    active admin key (a first start), handed to it once (None: one exists)."""
    if settings.admin_key is not None:
        await db.keys.ensure(
            settings.admin_key.get_secret_value(), OPERATOR_TENANT, "admin", "NIMBUS_ADMIN_KEY"
        )
        return
    if on_admin_key is None:
        return
    keys = await db.keys.all(OPERATOR_TENANT)
    if any(k.scope == "admin" and not k.revoked_at for k in keys):
        on_admin_key(None)
        return
    key, _ = await db.keys.create(OPERATOR_TENANT, "admin", "bootstrap")
    on_admin_key(key)


def create_app(
    settings: Settings | None = None,
    *,
    workers: bool = True,
    api: bool = True,
    on_admin_key: Callable[[str | None], None] | None = None,
) -> FastAPI:
    """The Nimbus ASGI app for ``settings``: the API with in-process workers (the default),
    the API only (``workers=False``: ``nimbus serve --api-only``), or workers with only the
    system endpoints (``api=False``: ``nimbus worker``). ``on_admin_key``: see
    :func:`_admin_key` (``nimbus serve`` prints what it is given)."""
    settings = settings or Settings()
    workers = workers and not settings.api_only

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = await Database.open(
            settings.database_url,
            pool_size=settings.database_pool_size,
            tenant_max_queued=settings.tenant_max_queued,
        )
        if db.queue is None and not (api and workers):
            await db.close()
            raise ConfigError(
                "API-only servers and separate workers need a database they can share: set "
                "NIMBUS_DATABASE_URL to a PostgreSQL URL"
            )
        if api:
            await _admin_key(settings, db, on_admin_key)
        broker = RunBroker()
        agents = AgentFactory(
            ModelCatalog(settings),
            builtin_tools(settings),
            max_thread_bytes=settings.max_thread_bytes,
        )
        bus = open_bus(db, settings.redis_url)
        if bus is not None:
            await bus.start()
        pool = worker_pool(
            db,
            broker,
            agents,
            settings.workers,
            settings.tenant_max_running,
            bus=bus,
            lease_s=settings.lease_ttl_s,
            poll_s=settings.poll_s,
        )
        follower = None
        if bus is not None and api:
            follower = FeedFollower(bus, db.runs, settings.poll_s)
            await follower.start()
        app.state.services = Services(
            settings,
            db,
            broker,
            agents,
            pool,
            RunService(db, broker, agents, pool, follower),
            TenantStreams(settings.tenant_max_streams),
        )
        if workers:
            await pool.start()
        _tune_gc()
        log.info(
            "server.started",
            version=__version__,
            role="api+worker" if api and workers else "api" if api else "worker",
            worker=pool.owner if workers else None,
        )
        try:
            yield
        finally:
            await pool.stop(settings.shutdown_grace_s)
            if bus is not None:
                await bus.close()
            await agents.aclose()
            await db.close()
            log.info("server.stopped")

    app = FastAPI(
        title="Nimbus",
        version=__version__,
        lifespan=lifespan,
        description="LangGraph-compatible agent server with an OpenAI-compatible facade.",
    )
    errors.install(app)
    # The routes go on the app's own router, not as included routers: FastAPI matches an
    # included router's routes through a layer of its own on every request (measured: a
    # third of its time before the handler). Runs first: they are most of the traffic. No
    # path of one module can match a path of another, so the order changes nothing else.
    routers = [system.health]
    if api:
        routers = [runs.router, system.health, *(m.router for m in (system, assistants, threads))]
        routers += [store.router, openai.router]
    for router in routers:
        app.router.routes.extend(router.routes)
    app.add_middleware(
        Guard, max_body=settings.max_body_bytes, body_timeout_s=settings.body_timeout_s
    )
    return app


def app_factory() -> Any:
    """For ``uvicorn --factory nimbus.adapters.api.app:app_factory``."""
    return create_app()
