"""Request bodies of the LangGraph-compatible API (pydantic, validated at the edge).

Unknown fields are ignored, so newer clients keep working; wrong types are 422s. Every body
must also be storable as it is on SQLite and PostgreSQL alike (:func:`storable`).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

JSONObject = dict[str, Any]
Limit = Field(default=10, ge=1, le=1000)
Offset = Field(default=0, ge=0, le=1_000_000)
MAX_DEPTH = 32
INT32_MAX = 2**31 - 1


def storable(data: Any) -> None:
    """Refuse JSON no database column can hold the same everywhere: NUL characters
    (PostgreSQL text and jsonb reject them), lone surrogates, NaN/Infinity (not JSON) and
    nesting deeper than :data:`MAX_DEPTH`. Raises ValueError naming where the value is."""
    stack: list[tuple[str, Any, int]] = [("", data, 0)]
    while stack:
        where, value, depth = stack.pop()
        if isinstance(value, str):
            _text(where, value)
        elif isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{where or 'body'}: numbers must be finite (no NaN or Infinity)")
        elif isinstance(value, dict | list):
            if depth >= MAX_DEPTH:
                raise ValueError(f"{where or 'body'}: nested deeper than {MAX_DEPTH} levels")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                label = key if isinstance(key, str) and key.isprintable() else repr(key)
                path = f"{where}.{label}" if where else str(label)
                if isinstance(key, str):
                    _text(f"{path} (key)", key)
                stack.append((path, item, depth + 1))


def _text(where: str, text: str) -> None:
    if "\x00" in text:
        raise ValueError(f"{where}: text may not contain NUL (\\u0000) characters")
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{where}: text is not valid Unicode (lone surrogate)") from None


_NOT_IN_A_PATH = frozenset("/\\?#%")


def path_id(value: str) -> str:
    """An id a client chooses for a thread or an assistant must be addressable afterwards as
    one segment of a URL path: no ``/ \\ ? # %``, spaces or control characters, and not ``.``
    or ``..`` (which clients and proxies resolve away). Raises ValueError otherwise."""
    if value in (".", "..") or any(
        c in _NOT_IN_A_PATH or c.isspace() or not c.isprintable() for c in value
    ):
        raise ValueError(
            "an id may not be '.' or '..' nor contain '/', '\\', '?', '#', '%', spaces or "
            "control characters (it must fit in a URL path)"
        )
    return value


PathId = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(path_id)]


class Body(BaseModel):
    """Base of request bodies."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _storable(cls, data: Any) -> Any:
        storable(data)
        return data


class AssistantCreate(Body):
    assistant_id: PathId | None = None
    graph_id: str = Field(min_length=1, max_length=200)
    config: JSONObject = Field(default_factory=dict)
    context: JSONObject = Field(default_factory=dict)
    metadata: JSONObject = Field(default_factory=dict)
    if_exists: Literal["raise", "do_nothing"] = "raise"
    name: str | None = Field(default=None, max_length=200)
    description: str | None = Field(default=None, max_length=10_000)


class AssistantPatch(Body):
    graph_id: str | None = Field(default=None, min_length=1, max_length=200)
    config: JSONObject | None = None
    context: JSONObject | None = None
    metadata: JSONObject | None = None
    name: str | None = Field(default=None, max_length=200)
    description: str | None = Field(default=None, max_length=10_000)


class AssistantSearch(Body):
    metadata: JSONObject | None = None
    graph_id: str | None = None
    name: str | None = None
    limit: int = Limit
    offset: int = Offset
    sort_by: Literal["assistant_id", "graph_id", "name", "created_at", "updated_at"] | None = None
    sort_order: Literal["asc", "desc"] | None = None
    select: list[str] | None = None


class AssistantCount(Body):
    metadata: JSONObject | None = None
    graph_id: str | None = None
    name: str | None = None


class VersionSearch(Body):
    metadata: JSONObject | None = None
    limit: int = Limit
    offset: int = Offset


class SetLatest(Body):
    version: int = Field(ge=1, le=INT32_MAX)


class ThreadCreate(Body):
    thread_id: PathId | None = None
    metadata: JSONObject = Field(default_factory=dict)
    if_exists: Literal["raise", "do_nothing"] = "raise"


class ThreadPatch(Body):
    metadata: JSONObject = Field(default_factory=dict)


class ThreadSearch(Body):
    metadata: JSONObject | None = None
    values: JSONObject | None = None
    ids: list[str] | None = Field(default=None, max_length=1000)
    status: Literal["idle", "busy", "interrupted", "error"] | None = None
    limit: int = Limit
    offset: int = Offset
    sort_by: Literal["thread_id", "status", "created_at", "updated_at"] | None = None
    sort_order: Literal["asc", "desc"] | None = None
    select: list[str] | None = None


class ThreadCount(Body):
    metadata: JSONObject | None = None
    values: JSONObject | None = None
    status: Literal["idle", "busy", "interrupted", "error"] | None = None


class CheckpointRef(Body):
    checkpoint_id: str | None = Field(default=None, max_length=64)


class StateUpdate(Body):
    values: JSONObject | list[Any] | None = None
    as_node: str | None = None
    checkpoint: JSONObject | None = None
    checkpoint_id: str | None = None


class HistoryQuery(Body):
    limit: int = Limit
    before: str | CheckpointRef | None = Field(default=None, union_mode="left_to_right")
    metadata: JSONObject | None = None
    checkpoint: JSONObject | None = None


StreamMode = Literal[
    "values",
    "updates",
    "messages",
    "messages-tuple",
    "events",
    "debug",
    "custom",
    "tasks",
    "checkpoints",
]


class RunCreate(Body):
    assistant_id: str = Field(min_length=1, max_length=200)
    input: JSONObject | None = None
    command: JSONObject | None = None
    config: JSONObject | None = None
    context: JSONObject | None = None
    metadata: JSONObject = Field(default_factory=dict)
    stream_mode: StreamMode | list[StreamMode] = "values"
    stream_subgraphs: bool = False
    stream_resumable: bool = False
    multitask_strategy: Literal["reject", "interrupt", "rollback", "enqueue"] = "reject"
    if_not_exists: Literal["create", "reject"] = "reject"
    on_disconnect: Literal["cancel", "continue"] = "continue"
    on_completion: Literal["delete", "keep"] | None = None
    after_seconds: float | None = Field(default=None, ge=0)
    interrupt_before: Any = None
    interrupt_after: Any = None
    webhook: str | None = None
    checkpoint: JSONObject | None = None
    checkpoint_id: str | None = None
    durability: Literal["sync", "async", "exit"] | None = Field(
        default=None,
        description="When the run's steps are written: `async` (while the next step runs), "
        "`sync` (before it starts) or `exit` (only at the end); the server's default if unset.",
    )
    feedback_keys: list[str] | None = None


class RunsCancel(Body):
    """``POST /runs/cancel`` (the SDK's ``cancel_many``): runs by id (of a thread, if given),
    or every run of the caller with a status."""

    thread_id: str | None = Field(default=None, max_length=64)
    run_ids: list[str] | None = Field(default=None, max_length=1000)
    status: Literal["pending", "running", "all"] | None = None

    @model_validator(mode="after")
    def _one_way(self) -> RunsCancel:
        if bool(self.run_ids) == bool(self.status):
            raise ValueError("give either run_ids (with thread_id or not) or status")
        if self.thread_id is not None and not self.run_ids:
            raise ValueError("thread_id goes with run_ids")
        return self


class StateAt(Body):
    """``POST /threads/{id}/state/checkpoint`` (the SDK's ``get_state(checkpoint=…)``)."""

    checkpoint: CheckpointRef
    subgraphs: bool = False
    select: list[str] | None = None


MAX_BATCH = 100  #: runs in one ``POST /runs/batch``


class StorePut(Body):
    namespace: list[str] = Field(min_length=1, max_length=20)
    key: str = Field(min_length=1, max_length=1000)
    value: JSONObject
    index: Any = None
    ttl: float | None = None


class StoreDelete(Body):
    namespace: list[str] = Field(default_factory=list, max_length=20)
    key: str = Field(min_length=1, max_length=1000)


class StoreSearch(Body):
    namespace_prefix: list[str] = Field(default_factory=list, max_length=20)
    filter: JSONObject | None = None
    limit: int = Limit
    offset: int = Offset
    query: str | None = Field(default=None, max_length=10_000)
    refresh_ttl: bool | None = None


class NamespaceList(Body):
    prefix: list[str] | None = None
    suffix: list[str] | None = None
    max_depth: int | None = Field(default=None, ge=1, le=100)
    limit: int = Field(default=100, ge=1, le=1000)
    offset: int = Offset


class KeyCreate(Body):
    tenant_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    scope: Literal["admin", "read-write", "read-only"] = "read-write"
    name: str = Field(default="", max_length=200)
