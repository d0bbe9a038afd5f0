"""Errors as HTTP problems, in one place: every 4xx has a JSON body that says what is wrong,
and an unexpected failure is a JSON 500 that says nothing about the internals."""

from __future__ import annotations

from typing import Any

import asyncpg
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException

from nimbus.adapters.store.engine import unavailable
from nimbus.exceptions import (
    ConfigError,
    IdempotencyConflict,
    NotAllowed,
    NotFound,
    QueueFull,
    ThreadBusy,
    UserError,
)

log = structlog.get_logger("nimbus.adapters.api")


RETRY_AFTER_S = 5  # what a 503 asks clients to wait while the database is unavailable


class APIError(Exception):
    """An HTTP error with a message for the client."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def not_found(what: str, id: str) -> APIError:
    """404 — the same for a missing id and another tenant's id."""
    return APIError(404, f"{what} {id!r} not found")


def _body(status: int, message: str, errors: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {"detail": message, "status": status}
    if errors is not None:
        body["errors"] = errors
    return body


def install(app: FastAPI) -> None:
    """Map every exception to a JSON problem response."""

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(_body(exc.status, exc.message), exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        for err in exc.errors():
            if err.get("type") == "json_invalid":
                loc = err.get("loc", ())
                where = f" at character {loc[-1]}" if len(loc) > 1 else ""
                reason = (err.get("ctx") or {}).get("error") or "not JSON"
                return JSONResponse(_body(400, f"malformed JSON body: {reason}{where}"), 400)
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            problems.append({"loc": loc, "msg": msg})
        summary = "; ".join(f"{p['loc'] or 'body'}: {p['msg']}" for p in problems[:5])
        return JSONResponse(_body(422, f"invalid request: {summary}", problems), 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            _body(exc.status_code, str(exc.detail)),
            exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(IdempotencyConflict)
    async def reused_key(_: Request, exc: IdempotencyConflict) -> JSONResponse:
        return JSONResponse(
            _body(409, f"Idempotency-Key {exc.args[0]!r} was used before with another request"),
            status_code=409,
        )

    @app.exception_handler(ThreadBusy)
    async def busy(_: Request, exc: ThreadBusy) -> JSONResponse:
        return JSONResponse(
            _body(
                409, f"thread {exc.args[0]!r} is busy with another run (multitask_strategy=reject)"
            ),
            409,
        )

    @app.exception_handler(QueueFull)
    async def queue_full(_: Request, exc: QueueFull) -> JSONResponse:
        return JSONResponse(
            _body(
                429,
                "this tenant has as many runs waiting to start as it may "
                "(NIMBUS_TENANT_MAX_QUEUED); retry later",
            ),
            429,
            headers={"Retry-After": "1"},
        )

    @app.exception_handler(ConfigError)
    async def config_error(_: Request, exc: ConfigError) -> JSONResponse:
        return JSONResponse(_body(422, str(exc)), 422)

    @app.exception_handler(NotFound)
    async def not_found_error(_: Request, exc: NotFound) -> JSONResponse:
        return JSONResponse(_body(404, str(exc)), 404)

    @app.exception_handler(NotAllowed)
    async def not_allowed(_: Request, exc: NotAllowed) -> JSONResponse:
        return JSONResponse(_body(403, str(exc)), 403)

    @app.exception_handler(UserError)
    async def user_error(_: Request, exc: UserError) -> JSONResponse:
        return JSONResponse(_body(422, str(exc)), 422)

    @app.exception_handler(DataError)
    async def data_error(_: Request, exc: DataError) -> JSONResponse:
        # A value the database refused (out of range, not representable): the request's fault,
        # but the driver's message quotes SQL, so it is logged and not sent.
        log.warning("request.data_error", error=type(exc.orig).__name__)
        return JSONResponse(_body(422, "a value in the request is out of range or malformed"), 422)

    # Database errors are handled here, not left to the catch-all below (which Starlette
    # re-raises, closing the connection): unavailable → 503 with Retry-After, else 500.
    async def database_error(_: Request, exc: Exception) -> JSONResponse:
        if unavailable(exc):
            log.warning("request.database_unavailable", error=type(exc).__name__)
            return JSONResponse(
                _body(503, "the database is unavailable; retry later"),
                503,
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        log.error("request.failed", exc_info=exc)
        return JSONResponse(_body(500, "internal server error (see the server logs)"), 500)

    for kind in (DBAPIError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
        app.add_exception_handler(kind, database_error)

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(_body(500, "internal server error (see the server logs)"), 500)
