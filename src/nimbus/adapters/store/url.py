"""A database URL, parsed once: which database, and the form each driver takes.

``sqlite:///path.db`` (or ``sqlite://`` in memory) and ``postgresql://user@host/db`` are what
users write; SQLAlchemy wants ``sqlite+aiosqlite``/``postgresql+asyncpg``, asyncpg and libpq
``postgresql://``. Anything else is a :class:`~nimbus.exceptions.ConfigError` that says so,
raised where the URL is first read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from nimbus.exceptions import ConfigError


@dataclass(frozen=True, slots=True)
class DatabaseURL:
    """A parsed database URL."""

    url: URL
    kind: Literal["sqlite", "postgresql"]

    @classmethod
    def parse(cls, text: str) -> DatabaseURL:
        """``text`` parsed; ConfigError when it is not an SQLite or PostgreSQL URL."""
        try:
            url = make_url(text)
        except ArgumentError:
            raise ConfigError(f"not a database URL: {text!r}") from None
        backend = url.get_backend_name()
        if backend == "sqlite":
            return cls(url, "sqlite")
        if backend in ("postgresql", "postgres"):
            return cls(url, "postgresql")
        raise ConfigError(
            f"unsupported database {backend!r} in URL; use sqlite:// or postgresql://"
        )

    @property
    def shared(self) -> bool:
        """Whether processes can share it (PostgreSQL): API replicas and separate workers."""
        return self.kind == "postgresql"

    @property
    def in_memory(self) -> bool:
        """An SQLite database in memory (``sqlite://``, ``sqlite:///:memory:``): it lives
        and dies with the connection of one process."""
        return self.kind == "sqlite" and self.url.database in (None, "", ":memory:")

    @property
    def path(self) -> str | None:
        """The file of an SQLite database (None in memory or on PostgreSQL)."""
        return None if self.kind != "sqlite" or self.in_memory else self.url.database

    @property
    def for_sqlalchemy(self) -> str:
        """The URL of SQLAlchemy's async driver (aiosqlite or asyncpg)."""
        driver = "sqlite+aiosqlite" if self.kind == "sqlite" else "postgresql+asyncpg"
        return self.url.set(drivername=driver).render_as_string(hide_password=False)

    @property
    def dsn(self) -> str:
        """The libpq-style URL asyncpg takes (PostgreSQL)."""
        return self.url.set(drivername="postgresql").render_as_string(hide_password=False)

    @property
    def shown(self) -> str:
        """Where it is, for a log line or a message: no user name or password."""
        if self.kind == "sqlite":
            return "memory" if self.in_memory else f"sqlite:///{self.path}"
        port = f":{self.url.port}" if self.url.port else ""
        return f"postgresql://{self.url.host or ''}{port}/{self.url.database or ''}"
