"""Dependencies of the route handlers: the services and the caller's principal."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from nimbus.adapters.api.errors import APIError
from nimbus.adapters.api.streams import TenantStreams
from nimbus.adapters.store.database import Database
from nimbus.adapters.store.keys import Principal
from nimbus.service.agents import AgentFactory
from nimbus.service.broker import RunBroker
from nimbus.service.runs import RunService
from nimbus.service.workers import Workers
from nimbus.settings import Settings


@dataclass
class Services:
    """Everything the handlers use, built once at start-up."""

    settings: Settings
    db: Database
    broker: RunBroker
    agents: AgentFactory
    pool: Workers
    runs: RunService
    streams: TenantStreams = field(default_factory=lambda: TenantStreams(100))


async def services(request: Request) -> Services:
    """The app's services."""
    found: Services = request.app.state.services
    return found


def _key(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def principal(request: Request) -> Principal:
    """The caller, from ``x-api-key`` or ``Authorization: Bearer``; 401 without a valid key."""
    key = _key(request)
    if not key:
        raise APIError(
            401, "missing API key: send it in the x-api-key header", {"WWW-Authenticate": "Bearer"}
        )
    found = await (await services(request)).db.keys.authenticate(key)
    if found is None:
        raise APIError(401, "invalid or revoked API key", {"WWW-Authenticate": "Bearer"})
    request.state.tenant = found.tenant_id
    return found


# ``writer`` and ``admin`` call ``principal`` rather than depend on it: FastAPI's cost per
# request grows with every dependency it solves, and these run on every request.


async def writer(request: Request) -> Principal:
    """The caller of a route that may change state: read-only keys get 403 unless the method
    is safe. Routes that only read but are POSTs (search, count, history) take a ``Reader``."""
    caller = await principal(request)
    if not caller.can_write and request.method not in SAFE_METHODS:
        raise APIError(403, "this API key is read-only")
    return caller


async def admin(request: Request) -> Principal:
    """The caller, who must hold an admin key."""
    caller = await principal(request)
    if not caller.is_admin:
        raise APIError(403, "an admin API key is required")
    return caller


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
Svc = Annotated[Services, Depends(services)]
Reader = Annotated[Principal, Depends(principal)]
Caller = Annotated[Principal, Depends(writer)]
Admin = Annotated[Principal, Depends(admin)]
