"""The tables. Every row carries its tenant; ids are UUID strings."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData()

Json = JSON().with_variant(JSONB(), "postgresql")
# JSON that is written and read whole, never searched: PostgreSQL's `json` keeps the text as is,
# which costs it much less than parsing it into `jsonb` (run states, events, checkpoints).
JsonText = JSON()
Id = String(64)


def _ts(name: str) -> Column[object]:
    return Column(name, DateTime(timezone=True), nullable=False)


api_keys = Table(
    "api_keys",
    metadata,
    Column("key_id", Id, primary_key=True),
    Column("tenant_id", Id, nullable=False, index=True),
    Column("key_hash", String(128), nullable=False, unique=True),
    Column("prefix", String(16), nullable=False),
    Column("scope", String(16), nullable=False),
    Column("name", String(200), nullable=False, default=""),
    _ts("created_at"),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
)

assistants = Table(
    "assistants",
    metadata,
    Column("assistant_id", Id, nullable=False),
    Column("tenant_id", Id, nullable=False),
    Column("graph_id", String(200), nullable=False),
    Column("name", String(200), nullable=False),
    Column("description", Text, nullable=True),
    Column("config", Json, nullable=False),
    Column("context", Json, nullable=False),
    Column("metadata", Json, nullable=False),
    Column("version", Integer, nullable=False),
    _ts("created_at"),
    _ts("updated_at"),
    PrimaryKeyConstraint("tenant_id", "assistant_id"),  # ids are per tenant
    Index("ix_assistants_tenant_created", "tenant_id", "created_at"),
)

assistant_versions = Table(
    "assistant_versions",
    metadata,
    Column("assistant_id", Id, nullable=False),
    Column("version", Integer, nullable=False),
    Column("tenant_id", Id, nullable=False, index=True),
    Column("graph_id", String(200), nullable=False),
    Column("name", String(200), nullable=False),
    Column("description", Text, nullable=True),
    Column("config", Json, nullable=False),
    Column("context", Json, nullable=False),
    Column("metadata", Json, nullable=False),
    _ts("created_at"),
    PrimaryKeyConstraint("tenant_id", "assistant_id", "version"),
)

threads = Table(
    "threads",
    metadata,
    Column("thread_id", Id, nullable=False),
    Column("tenant_id", Id, nullable=False),
    Column("status", String(16), nullable=False),
    Column("metadata", Json, nullable=False),
    Column("values", Json, nullable=False),
    Column("checkpoint_id", Id, nullable=True),
    _ts("created_at"),
    _ts("updated_at"),
    Index("ix_threads_tenant_created", "tenant_id", "created_at"),
    PrimaryKeyConstraint("tenant_id", "thread_id"),  # ids are per tenant
)

checkpoints = Table(
    "checkpoints",
    metadata,
    Column("checkpoint_id", Id, primary_key=True),
    Column("tenant_id", Id, nullable=False),
    Column("thread_id", Id, nullable=False),
    Column("parent_id", Id, nullable=True),
    Column("run_id", Id, nullable=True),
    Column("step", Integer, nullable=False),
    # "full": the values whole; "append": the messages appended to the parent's (see
    # nimbus.adapters.store.checkpoints). seq: the place in its chain (NULL before revision 0009).
    Column("kind", String(8), nullable=False, server_default="full"),
    Column("seq", Integer, nullable=True),
    Column("values", JsonText, nullable=False),
    Column("metadata", Json, nullable=False),
    Column("next", JsonText, nullable=False),
    _ts("created_at"),
    Index("ix_checkpoints_thread", "tenant_id", "thread_id", "created_at"),
)

runs = Table(
    "runs",
    metadata,
    Column("run_id", Id, primary_key=True),
    Column("tenant_id", Id, nullable=False),
    Column("thread_id", Id, nullable=False),
    Column("assistant_id", Id, nullable=False),
    Column("status", String(16), nullable=False),
    Column("metadata", Json, nullable=False),
    Column("kwargs", JsonText, nullable=False),
    Column("multitask_strategy", String(16), nullable=False),
    Column("state", JsonText, nullable=True),
    Column("error", Text, nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    _ts("created_at"),
    _ts("updated_at"),
    # The lease of the worker executing the run (PostgreSQL; see
    # nimbus.adapters.store.postgres_runs): who holds
    # it (alive while its row in `workers` is), and the fencing token every step write of the
    # holder must carry. The token grows at each claim and each expiry, so a worker that lost
    # its lease cannot write.
    Column("lease_owner", Id, nullable=True),
    Column("lease_token", BigInteger, nullable=False, default=0, server_default="0"),
    Index("ix_runs_thread", "tenant_id", "thread_id", "created_at"),
    Index("ix_runs_status", "status", "created_at"),
    # PostgreSQL's queue: the waiting runs of each tenant, oldest first; the runs held.
    Index(
        "ix_runs_pending",
        "tenant_id",
        "created_at",
        postgresql_where=text("status = 'pending'"),
        sqlite_where=text("status = 'pending'"),
    ),
    Index(
        "ix_runs_lease_owner",
        "lease_owner",
        postgresql_where=text("lease_owner IS NOT NULL"),
        sqlite_where=text("lease_owner IS NOT NULL"),
    ),
)

# Workers alive (PostgreSQL): each renews its row's expiry; the runs it holds are its while
# the row has not expired. One row per worker process, so renewing costs one row whatever
# the number of runs it holds.
workers = Table(
    "workers",
    metadata,
    Column("worker_id", Id, primary_key=True),
    _ts("started_at"),
    _ts("expires_at"),
)

run_attempts = Table(
    "run_attempts",
    metadata,
    Column("run_id", Id, primary_key=True),
    Column("attempt", Integer, primary_key=True),
    Column("tenant_id", Id, nullable=False),
    Column("worker", String(64), nullable=True),  #: the lease owner that claimed it
    _ts("claimed_at"),
)

run_events = Table(
    "run_events",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("run_id", Id, nullable=False),
    Column("tenant_id", Id, nullable=False),
    Column("seq", Integer, nullable=False),
    Column("event", String(64), nullable=False),
    Column("data", JsonText, nullable=False),
    Index("ix_run_events_run_seq", "run_id", "seq", unique=True),
)

idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("tenant_id", Id, primary_key=True),
    Column("key", String(200), primary_key=True),
    Column("request_hash", String(64), nullable=False),
    Column("run_id", Id, nullable=False),
    _ts("created_at"),
)

store_items = Table(
    "store_items",
    metadata,
    Column("tenant_id", Id, primary_key=True),
    Column("namespace", String(1000), primary_key=True),
    Column("key", String(1000), primary_key=True),
    Column("value", Json, nullable=False),
    _ts("created_at"),
    _ts("updated_at"),
)
