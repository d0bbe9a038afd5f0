"""API keys: random, shown once, stored as SHA-256 hashes, revocable, scoped to a tenant."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from nimbus.adapters.store.engine import autocommit
from nimbus.adapters.store.schema import api_keys

Scope = Literal["admin", "read-write", "read-only"]
SCOPES: tuple[Scope, ...] = ("admin", "read-write", "read-only")
KEY_PREFIX = "nmb_"


def new_key() -> str:
    """A new random API key (shown once; only its hash is stored)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


#: The tenant of ``NIMBUS_ADMIN_KEY``: its admins manage every tenant's keys.
OPERATOR_TENANT = "default"
#: How long a process trusts a key it has looked up: a revocation made through another
#: process (or the CLI) takes effect within this time.
CACHE_TTL_S = 2.0


def hash_key(key: str) -> str:
    """The stored form of a key (keys are 256-bit random, so a plain SHA-256 suffices)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the tenant and the scope of their key."""

    tenant_id: str
    scope: Scope
    key_id: str

    @property
    def can_write(self) -> bool:
        """Whether the key may change state."""
        return self.scope != "read-only"

    @property
    def is_admin(self) -> bool:
        """Whether the key may manage keys."""
        return self.scope == "admin"


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """A key's public description (never the key itself)."""

    key_id: str
    tenant_id: str
    prefix: str
    scope: str
    name: str
    created_at: datetime
    revoked_at: datetime | None


class KeyStore:
    """Create, look up, list and revoke API keys."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.auto = autocommit(engine)
        self._cache: dict[str, tuple[float, Principal]] = {}
        self._lookups: dict[str, asyncio.Future[Principal | None]] = {}

    async def create(self, tenant_id: str, scope: Scope, name: str = "") -> tuple[str, KeyInfo]:
        """Make a key; returns the key (shown once) and its description."""
        key = new_key()
        info = KeyInfo(uuid.uuid4().hex, tenant_id, key[:12], scope, name, datetime.now(UTC), None)
        async with self.engine.begin() as conn:
            await conn.execute(
                api_keys.insert().values(
                    key_id=info.key_id,
                    tenant_id=tenant_id,
                    key_hash=hash_key(key),
                    prefix=info.prefix,
                    scope=scope,
                    name=name,
                    created_at=info.created_at,
                )
            )
        return key, info

    async def ensure(self, key: str, tenant_id: str, scope: Scope, name: str) -> None:
        """Store ``key`` (e.g. ``NIMBUS_ADMIN_KEY``) if it is not stored yet."""
        digest = hash_key(key)
        # IntegrityError: another process starting at the same moment stored it
        with contextlib.suppress(IntegrityError):
            await self._insert_once(key, digest, tenant_id, scope, name)

    async def _insert_once(
        self, key: str, digest: str, tenant_id: str, scope: Scope, name: str
    ) -> None:
        async with self.engine.begin() as conn:
            found = await conn.scalar(
                select(api_keys.c.key_id).where(api_keys.c.key_hash == digest)
            )
            if found is None:
                await conn.execute(
                    api_keys.insert().values(
                        key_id=uuid.uuid4().hex,
                        tenant_id=tenant_id,
                        key_hash=digest,
                        prefix=key[:12],
                        scope=scope,
                        name=name,
                        created_at=datetime.now(UTC),
                    )
                )

    async def authenticate(self, key: str) -> Principal | None:
        """The principal of a valid, unrevoked key, else ``None``."""
        digest = hash_key(key)
        cached = self._cache.get(digest)
        if cached is not None and time.monotonic() - cached[0] < CACHE_TTL_S:
            return cached[1]
        # One lookup per key at a time: when the cached answer expires under load, the
        # requests that arrive meanwhile wait for it rather than each asking the database.
        pending = self._lookups.get(digest)
        if pending is not None:
            return await asyncio.shield(pending)
        lookup = asyncio.ensure_future(self._lookup(digest))
        self._lookups[digest] = lookup
        try:
            return await asyncio.shield(lookup)
        finally:
            if lookup.done():
                self._lookups.pop(digest, None)
            else:
                lookup.add_done_callback(lambda _: self._lookups.pop(digest, None))

    async def _lookup(self, digest: str) -> Principal | None:
        async with self.auto.connect() as conn:
            row = (
                await conn.execute(
                    select(api_keys.c.key_id, api_keys.c.tenant_id, api_keys.c.scope).where(
                        api_keys.c.key_hash == digest, api_keys.c.revoked_at.is_(None)
                    )
                )
            ).first()
        principal = Principal(row.tenant_id, row.scope, row.key_id) if row else None
        if principal is not None:  # only positive answers are cached; revoke() clears them
            self._cache[digest] = (time.monotonic(), principal)
        else:
            self._cache.pop(digest, None)
        return principal

    async def all(self, tenant_id: str | None = None) -> list[KeyInfo]:
        """Keys of one tenant (or all), newest first."""
        query = select(api_keys).order_by(api_keys.c.created_at.desc())
        if tenant_id is not None:
            query = query.where(api_keys.c.tenant_id == tenant_id)
        async with self.auto.connect() as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [
            KeyInfo(
                r["key_id"],
                r["tenant_id"],
                r["prefix"],
                r["scope"],
                r["name"],
                r["created_at"],
                r["revoked_at"],
            )
            for r in rows
        ]

    async def revoke(self, key_id: str, tenant_id: str | None = None) -> bool:
        """Revoke a key by id (within ``tenant_id`` if given); False if there is none."""
        query = update(api_keys).where(api_keys.c.key_id == key_id, api_keys.c.revoked_at.is_(None))
        if tenant_id is not None:
            query = query.where(api_keys.c.tenant_id == tenant_id)
        async with self.engine.begin() as conn:
            result = await conn.execute(query.values(revoked_at=datetime.now(UTC)))
        self._cache.clear()
        return bool(result.rowcount)
