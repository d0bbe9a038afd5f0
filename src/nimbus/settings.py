"""Configuration: one pydantic-settings class, read once at the edge and passed down.

Every field is a ``NIMBUS_*`` environment variable (``NIMBUS_DEFAULT_MODEL`` …); the OpenAI
endpoint also honours the usual ``OPENAI_BASE_URL`` and ``OPENAI_API_KEY``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Nimbus settings, from ``NIMBUS_*`` environment variables (and a ``.env`` file)."""

    # An empty variable (`NIMBUS_ADMIN_KEY=` in a .env file) means unset: the default, not ""
    model_config = SettingsConfigDict(
        env_prefix="NIMBUS_",
        env_file=".env",
        env_ignore_empty=True,
        extra="ignore",
        populate_by_name=True,
    )

    default_model: str = Field(
        default="local:smollm2", description="Model id used when none is given."
    )
    openai_base_url: str = Field(
        default="https://api.openai.com/v1",
        validation_alias=AliasChoices("NIMBUS_OPENAI_BASE_URL", "OPENAI_BASE_URL"),
        description="Base URL of the OpenAI-compatible endpoint for `openai:` models.",
    )
    openai_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("NIMBUS_OPENAI_API_KEY", "OPENAI_API_KEY"),
        description="API key sent to the OpenAI-compatible endpoint.",
    )
    model_timeout_s: float = Field(
        default=120.0, gt=0, description="Whole-request timeout of a model call."
    )
    model_connect_timeout_s: float = Field(default=10.0, gt=0, description="Connect timeout.")
    model_max_retries: int = Field(
        default=2, ge=0, le=10, description="Retries on 408/409/429/5xx."
    )
    model_max_connections: int = Field(
        default=1000, ge=1, description="Connection pool size per model."
    )
    local_threads: int | None = Field(
        default=None, ge=1, description="CPU threads for the local model."
    )
    local_context_tokens: int = Field(
        default=4096, ge=512, description="Context window of local models."
    )
    database_url: str = Field(
        default="sqlite:///.nimbus/nimbus.db",
        description="sqlite:///path.db (default) or postgresql://user@host:5432/db.",
    )
    database_pool_size: int = Field(
        default=20,
        ge=1,
        le=1000,
        description="PostgreSQL connections per pool (SQLAlchemy's and the hot path's).",
    )
    admin_key: SecretStr | None = Field(
        default=None, description="Bootstraps an admin API key for tenant `default` at start."
    )
    host: str = Field(default="127.0.0.1", description="Address `nimbus serve` listens on.")
    port: int = Field(default=8123, ge=0, le=65535, description="Port `nimbus serve` listens on.")
    max_body_bytes: int = Field(
        default=1_048_576, ge=1024, description="Largest request body (413)."
    )
    workers: int = Field(
        default=256, ge=1, description="Runs executed at once by the in-process pool."
    )
    tenant_max_running: int | None = Field(
        default=None,
        ge=1,
        description="Runs of one tenant executing at once (unset: up to `workers`); the "
        "others wait their turn, and other tenants' runs go ahead of them.",
    )
    tenant_max_queued: int | None = Field(
        default=None,
        ge=1,
        description="Runs of one tenant waiting for a slot; a run beyond that is refused "
        "with 429 (unset: no limit).",
    )
    tenant_max_streams: int = Field(
        default=100,
        ge=1,
        description="Event streams (run streams and joins) one tenant may hold open at once "
        "on one server process; one more is refused with 429.",
    )
    max_thread_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=65_536,
        description="Largest state a thread may grow to (its messages as JSON); a run that "
        "would grow it further fails with reason `thread_too_large`.",
    )
    sse_heartbeat_s: float = Field(
        default=15.0,
        ge=0,
        description="Seconds of silence after which a run's event stream sends a heartbeat "
        "comment (0: never).",
    )
    redis_url: str | None = Field(
        default=None,
        description="redis://host:6379/0: signals between processes (worker wake-ups, "
        "cancellations, live run events) go over Redis pub/sub; unset: PostgreSQL "
        "LISTEN/NOTIFY.",
    )
    api_only: bool = Field(
        default=False,
        description="Serve the API only; runs execute in `nimbus worker` processes "
        "(PostgreSQL only). Same as `nimbus serve --api-only`.",
    )
    worker_port: int = Field(
        default=8124, ge=0, le=65535, description="Port of a `nimbus worker`'s /ok and /metrics."
    )
    lease_ttl_s: float = Field(
        default=30.0,
        gt=0,
        description="PostgreSQL: how long a worker's claim on a run lasts unless renewed "
        "(renewed every third of it). A worker that stalls or is cut off has its runs taken "
        "over by another this long after its last renewal; one whose process dies, within "
        "about a second (its liveness lock is released with its connection).",
    )
    poll_s: float = Field(
        default=1.0,
        gt=0,
        description="PostgreSQL: how often an idle worker looks at the queue, and a stream "
        "of a run on another process reads the database, when no signal came.",
    )
    shutdown_grace_s: float = Field(
        default=10.0, ge=0, description="Time running steps get at shutdown."
    )
    durability: Literal["sync", "async", "exit"] = Field(
        default="async",
        description="When a run's steps are written, for runs that do not say (`durability`): "
        "`async`, while the next step runs; `sync`, before it starts; `exit`, only at the run's "
        "end. Before a tool that is not idempotent the step is always written first.",
    )
    log_format: str = Field(default="json", description="`json` or `console`.")
    tool_modules: list[str] | None = Field(
        default=None,
        description="Python modules whose `TOOLS` list (tools or typed functions) is added to "
        'the built-in tools, as a JSON list: `["mycompany.tools"]`.',
    )
    http_fetch_allowed_hosts: list[str] | None = Field(
        default=None,
        description="If set, `http_fetch` may only fetch these hosts (and subdomains).",
    )
    # Slow clients: connections and the time to send a request (see nimbus.adapters.api.connections)
    max_connections: int = Field(
        default=10_000,
        ge=1,
        description="Client connections open at once, per process; one more is answered 503 "
        "(with `Retry-After`) and closed before its request is read. Lowered at start, with a "
        "warning, to what the descriptor limit leaves for the database pools, model "
        "connections and files.",
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Time a client has to send a request's line and headers, from the "
        "connection's accept or from the first byte of each next request on a kept-alive "
        "connection; then 408 and the connection is closed. (An idle kept-alive connection "
        "is closed after uvicorn's 5 s keep-alive timeout.)",
    )
    body_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="Time a client has to send a whole request body, from the end of its "
        "head; then 408 and the connection is closed.",
    )
    model_max_response_bytes: int = Field(
        default=16 * 1024 * 1024,
        ge=1024,
        description="Largest response of a model endpoint, in bytes (a whole body, or a "
        "whole stream); past it the call fails and its connection is closed.",
    )
