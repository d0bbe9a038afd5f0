"""``nimbus serve`` and the commands that manage a server's database (keys, assistants)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from nimbus.settings import Settings

if TYPE_CHECKING:
    from nimbus.adapters.store.url import DatabaseURL

serve_app = typer.Typer()
keys_app = typer.Typer(
    help="Manage API keys (in the database NIMBUS_DATABASE_URL names).", no_args_is_help=True
)
assistants_app = typer.Typer(help="Manage assistants.", no_args_is_help=True)


def _settings(database_url: str | None) -> Settings:
    settings = Settings()
    if database_url:
        settings.database_url = database_url
    return settings


def _database(settings: Settings) -> DatabaseURL:
    """The settings' database URL, parsed (a clear error when it is not one)."""
    from nimbus.adapters.store.url import DatabaseURL

    return DatabaseURL.parse(settings.database_url)


def _print_admin_key(key: str | None) -> None:
    """What the server found at start: the admin key it made (the operator tenant had none),
    or None: one exists already."""
    if key:
        print(f"Admin API key (shown once, keep it): {key}", file=sys.stderr)
    else:
        print(
            "Admin key: the one printed at first start (or `nimbus keys create --tenant default "
            "--scope admin`)",
            file=sys.stderr,
        )


def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on.")] = None,
    database_url: Annotated[
        str | None, typer.Option(help="sqlite:///file.db or postgresql://…")
    ] = None,
    log_format: Annotated[str | None, typer.Option(help="json or console.")] = None,
    api_only: Annotated[
        bool,
        typer.Option(
            "--api-only",
            help="Serve the API only; runs execute in `nimbus worker` processes (PostgreSQL).",
        ),
    ] = False,
) -> None:
    """Run the Nimbus server (API + in-process workers, or the API only)."""
    from nimbus.adapters.api.app import create_app
    from nimbus.adapters.api.logging import configure_logging
    from nimbus.exceptions import UserError

    settings = _settings(database_url)
    if host:
        settings.host = host
    if port is not None:
        settings.port = port
    if log_format:
        settings.log_format = log_format
    settings.api_only = settings.api_only or api_only
    database = _database(settings)
    if settings.api_only and not database.shared:
        raise UserError(
            "--api-only needs a database shared with the workers: set NIMBUS_DATABASE_URL "
            "(or --database-url) to a PostgreSQL URL"
        )
    configure_logging(settings.log_format)
    url = f"http://{settings.host}:{settings.port}"
    print(f"Nimbus listening on {url} (database: {database.shown})", file=sys.stderr)
    on_admin_key = None if settings.admin_key is not None else _print_admin_key
    _serve(create_app(settings, on_admin_key=on_admin_key), settings.host, settings.port, settings)


def worker(
    concurrency: Annotated[
        int | None,
        typer.Option(help="Runs executed at once by this process (default NIMBUS_WORKERS).", min=1),
    ] = None,
    host: Annotated[str | None, typer.Option(help="Address of /ok and /metrics.")] = None,
    port: Annotated[
        int | None, typer.Option(help="Port of /ok and /metrics (default NIMBUS_WORKER_PORT).")
    ] = None,
    database_url: Annotated[str | None, typer.Option(help="postgresql://…")] = None,
    log_format: Annotated[str | None, typer.Option(help="json or console.")] = None,
) -> None:
    """Execute runs from the shared queue (PostgreSQL); serves only /ok and /metrics."""
    from nimbus.adapters.api.app import create_app
    from nimbus.adapters.api.logging import configure_logging
    from nimbus.exceptions import UserError

    settings = _settings(database_url)
    if not _database(settings).shared:
        raise UserError(
            "a worker needs the database shared with the API: set NIMBUS_DATABASE_URL (or "
            "--database-url) to a PostgreSQL URL"
        )
    if concurrency is not None:
        settings.workers = concurrency
    if log_format:
        settings.log_format = log_format
    configure_logging(settings.log_format)
    listen_host = host or settings.host
    listen_port = settings.worker_port if port is None else port
    print(
        f"Nimbus worker: {settings.workers} runs at once; /ok and /metrics on "
        f"http://{listen_host}:{listen_port}",
        file=sys.stderr,
    )
    _serve(create_app(settings, api=False), listen_host, listen_port, settings)


def _serve(app: object, host: str, port: int, settings: Settings) -> None:
    import uvicorn

    from nimbus.adapters.api.connections import (
        BoundedHttpProtocol,
        connection_cap,
        raise_descriptor_limit,
    )

    # Every client connection, database connection and file is a descriptor: the soft limit
    # a process often starts with (1024) is a thousand idle clients.
    descriptors = raise_descriptor_limit()
    protocol = BoundedHttpProtocol.limited(
        connection_cap(settings, descriptors), settings.header_timeout_s
    )
    config = uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s) + 5,
        loop="uvloop",
        http=protocol,  # httptools, with limits on connections and request heads
        # A full accept queue drops new connections (clients retry a second or more later):
        # as deep as the kernel allows by default (net.core.somaxconn).
        backlog=4096,
    )
    _Server(config).run()


class _Server:
    """uvicorn's server, but a SIGTERM/SIGINT ends in a clean exit 0 after the graceful
    shutdown (uvicorn re-raises the signal, which reads as a crash to supervisors)."""

    def __init__(self, config: object) -> None:
        import uvicorn

        class Quiet(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(sig, self.handle_exit, sig, None)
                try:
                    yield
                finally:
                    for sig in (signal.SIGTERM, signal.SIGINT):
                        loop.remove_signal_handler(sig)

        self.server = Quiet(config)  # type: ignore[arg-type]

    def run(self) -> None:
        from nimbus.aio import run_async

        run_async(self.server.serve())


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant the key belongs to.")],
    scope: Annotated[str, typer.Option(help="admin, read-write or read-only.")] = "read-write",
    name: Annotated[str, typer.Option(help="A label for the key.")] = "",
    database_url: Annotated[
        str | None, typer.Option(help="Database (default NIMBUS_DATABASE_URL).")
    ] = None,
) -> None:
    """Create an API key; prints only the key on stdout."""
    from nimbus.adapters.store.database import Database
    from nimbus.adapters.store.keys import SCOPES
    from nimbus.exceptions import UserError

    if scope not in SCOPES:
        raise UserError(f"--scope must be one of {', '.join(SCOPES)}")
    if not tenant.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise UserError("--tenant may hold letters, digits, '-', '_' and '.' only")

    async def go() -> str:
        db = await Database.open(_settings(database_url).database_url)
        try:
            key, _ = await db.keys.create(tenant, scope, name)
            return key
        finally:
            await db.close()

    print(asyncio.run(go()))


@keys_app.command("list")
def keys_list(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's keys.")] = None,
    database_url: Annotated[
        str | None, typer.Option(help="Database (default NIMBUS_DATABASE_URL).")
    ] = None,
) -> None:
    """List keys (ids, prefixes, scopes; never the keys)."""
    from nimbus.adapters.store.database import Database

    async def go() -> None:
        db = await Database.open(_settings(database_url).database_url)
        try:
            for k in await db.keys.all(tenant):
                state = f"revoked {k.revoked_at:%Y-%m-%d}" if k.revoked_at else "active"
                print(f"{k.key_id}  {k.tenant_id}  {k.scope:<10}  {k.prefix}…  {state}  {k.name}")
        finally:
            await db.close()

    asyncio.run(go())


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key id (from `nimbus keys list`).")],
    database_url: Annotated[
        str | None, typer.Option(help="Database (default NIMBUS_DATABASE_URL).")
    ] = None,
) -> None:
    """Revoke a key."""
    from nimbus.adapters.store.database import Database
    from nimbus.exceptions import UserError

    async def go() -> bool:
        db = await Database.open(_settings(database_url).database_url)
        try:
            return await db.keys.revoke(key_id)
        finally:
            await db.close()

    if not asyncio.run(go()):
        raise UserError(f"no active key with id {key_id!r}")
    print(f"revoked {key_id}", file=sys.stderr)


@assistants_app.command("create")
def assistants_create(
    agent: Annotated[Path, typer.Argument(help="Agent spec file (.yaml, .toml or .json).")],
    url: Annotated[
        str, typer.Option(envvar="NIMBUS_URL", help="Server URL.")
    ] = "http://127.0.0.1:8123",
    api_key: Annotated[str | None, typer.Option(envvar="NIMBUS_API_KEY", help="API key.")] = None,
) -> None:
    """Create an assistant on a server from an agent file; prints its JSON."""
    from nimbus.adapters.cli.remote import create_assistant

    print(asyncio.run(create_assistant(url, api_key, agent)))


@assistants_app.command("list")
def assistants_list(
    url: Annotated[
        str, typer.Option(envvar="NIMBUS_URL", help="Server URL.")
    ] = "http://127.0.0.1:8123",
    api_key: Annotated[str | None, typer.Option(envvar="NIMBUS_API_KEY", help="API key.")] = None,
) -> None:
    """List the assistants on a server."""
    from nimbus.adapters.cli.remote import list_assistants

    for line in asyncio.run(list_assistants(url, api_key)):
        print(line)
