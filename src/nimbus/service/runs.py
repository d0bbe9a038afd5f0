"""Runs as the API asks for them: queued, followed, waited for, cancelled, cleaned up.

The routes (``adapters/api/routes/runs.py``, the OpenAI facade) check what a request says
and shape what it gets back; what happens to the run is here. Queueing, for one: a worker
slot of this process is reserved first, so that a run that can start at once is claimed as
it is queued (one transaction, no hand-over); the usual run reads its assistant in the same
statement; the runs it interrupts are stopped wherever they execute.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from nimbus.exceptions import NotFound
from nimbus.ports import RunRequestStore
from nimbus.records import ACTIVE, Assistant, Event, Queued
from nimbus.service.agents import GRAPHS, AgentFactory
from nimbus.service.broker import RunBroker
from nimbus.service.feed import FeedFollower
from nimbus.service.workers import Workers

FORGET_WAIT_S = 10.0  #: how long deleting an assistant waits for its cancelled runs to end
#: how a run finished, as a waiter gets it: its row as stored
Row = dict[str, Any]


@dataclass(slots=True)
class RunRequest:
    """A run to queue, as a request asks for it (checked by the route)."""

    tenant_id: str
    assistant_id: str  #: an assistant's id, or a graph or assistant name
    thread_id: str | None  #: None: a new temporary thread (a stateless run)
    kwargs: dict[str, Any]
    metadata: dict[str, Any]
    multitask_strategy: str
    if_not_exists: str = "reject"
    #: (Idempotency-Key, hash of the request): the same key and request queue once
    idempotency: tuple[str, str] | None = None
    #: the run's own settings (config, context), checked against its assistant's
    config: dict[str, Any] | None = None
    context: dict[str, Any] | None = None


class RunService:
    """Runs for the API of one process."""

    def __init__(
        self,
        store: RunRequestStore,
        broker: RunBroker,
        agents: AgentFactory,
        workers: Workers,
        follower: FeedFollower | None = None,
    ) -> None:
        self.store, self.broker, self.agents = store, broker, agents
        self.workers, self.follower = workers, follower

    async def create(self, request: RunRequest, assistant: Assistant | None = None) -> Queued:
        """Queue a run; the workers take it. With an Idempotency-Key used before for the same
        request, the run made then (``replayed``), queued once. ``assistant``: the run's, when
        the caller has read it already. NotFound when the thread (that may not be created)
        or the assistant does not exist."""
        tenant = request.tenant_id
        runs = self.store.runs
        reserved = self.workers.reserve(tenant)  # a free slot here: claimed as it is queued
        claim_as = self.workers.owner if reserved else None
        try:
            queued: Queued | None = None
            if (
                request.thread_id is not None
                and request.idempotency is None
                and not (request.config or request.context)
            ):
                # The usual run (an assistant by id, graph or name; a thread that exists;
                # nothing to check against the assistant first): the assistant is read as
                # the run is queued.
                queued = await runs.create_with_assistant(
                    tenant,
                    thread_id=request.thread_id,
                    assistant_id=request.assistant_id,
                    kwargs=request.kwargs,
                    metadata=request.metadata,
                    multitask_strategy=request.multitask_strategy,
                    claim_as=claim_as,
                )
                if queued is not None:
                    assistant = queued.assistant
            if queued is None:
                assistant = await self._assistant(request, assistant)
                queued = await runs.create(
                    tenant,
                    thread_id=request.thread_id,
                    assistant_id=assistant["assistant_id"],
                    kwargs=request.kwargs,
                    metadata=request.metadata,
                    multitask_strategy=request.multitask_strategy,
                    if_not_exists=request.if_not_exists,
                    temporary=request.thread_id is None,
                    idempotency=request.idempotency,
                    claim_as=claim_as,
                )
        except BaseException:
            if reserved:
                self.workers.release(tenant)
            raise
        if queued is None or queued.replayed:
            if reserved:
                self.workers.release(tenant)
            if queued is None:
                raise NotFound("thread", request.thread_id or "")
            return queued
        for interrupted in queued.interrupted:
            self.workers.cancel_everywhere(interrupted)
        self.workers.submit(queued, assistant, reserved=reserved)
        if queued.claimed:
            # It starts here now: let it send its first model request before the request
            # goes on to build its response, which the client waits the model's time for.
            await asyncio.sleep(0)
        return queued

    async def _assistant(self, request: RunRequest, known: Assistant | None) -> Assistant:
        """The run's assistant (``known``, or read: by id, graph or name), its settings
        checked with the run's own ``config`` and ``context`` (ConfigError, NotAllowed)."""
        store = self.store.assistants
        tenant, name = request.tenant_id, request.assistant_id
        assistant = known or await store.find(tenant, name)
        if assistant is None and name in GRAPHS:
            assistant = await store.ensure_system(tenant, name)
        if not assistant:
            raise NotFound("assistant", name)
        if request.config or request.context:
            self.agents.validate(
                assistant["graph_id"],
                request.config,
                request.context,
                assistant=(assistant["config"], assistant["context"]),
            )
        return assistant

    async def events(
        self, run_id: str, after: int, idle_s: float | None = None, fresh: bool = False
    ) -> AsyncIterator[Event | None]:
        """A run's events after ``after``: the stored ones, then live ones until it ends,
        from this process or from the worker executing it elsewhere; with ``idle_s``,
        ``None`` after each ``idle_s`` seconds without one.

        A ``fresh`` run (queued by this request) has no stored events yet; a run followed
        live to its end has had every event delivered: neither needs the database."""
        runs, broker = self.store.runs, self.broker
        last = after
        if not (fresh and broker.is_live(run_id)):
            for event in await runs.events(run_id, after):
                last = event[0]
                yield event
        if broker.is_live(run_id):
            async for live in broker.subscribe(run_id, last, idle_s):
                if live is not None:
                    last = live[0]
                yield live
            if not self.workers.gone(run_id):
                return  # it ended here: every event was delivered
        if self.follower is not None and not await runs.ended(run_id):
            async for remote in self.follower.follow(run_id, last, idle_s):
                yield remote
            return
        for event in await runs.events(run_id, last):
            yield event

    async def wait(self, run: Mapping[str, Any]) -> Row:
        """Wait for a run to end; returns it as stored."""
        runs = self.store.runs
        done = self.workers.done_event(run["run_id"])
        if done is not None:
            await done.wait()
        if done is None or done.outcome is None:  # it ran (or runs) elsewhere, or not at all
            if self.follower is not None:
                # (``run`` may be the row as queued, pending, though the run has ended since)
                await self.follower.wait(run["run_id"])
            else:
                while await runs.status(run["run_id"]) in ACTIVE:  # noqa: ASYNC110
                    await asyncio.sleep(0.2)
        final = await runs.get(run["tenant_id"], run["run_id"])
        return final or dict(run)

    async def final_values(self, run: Mapping[str, Any]) -> dict[str, Any]:
        """The thread's values when the run ends (with ``__error__`` if it failed)."""
        done = self.workers.done_event(run["run_id"])
        if done is not None:
            await done.wait()
        if done is not None and done.outcome is not None:  # ended here: no need to read it
            status, error, values = done.outcome
        else:
            final = await self.wait(run)
            thread = await self.store.threads.get(run["tenant_id"], run["thread_id"])
            status, error = final["status"], final.get("error")
            values = thread["values"] if thread else {}
        values = dict(values)
        if status == "error":
            values["__error__"] = {"error": "RunError", "message": error or "the run failed"}
        return values

    async def cancel(
        self, tenant_id: str, run_id: str, thread_id: str | None, action: str = "interrupt"
    ) -> None:
        """Mark a run cancelled (``interrupt`` or ``rollback``) and stop it wherever it
        executes."""
        await self.store.runs.cancel(tenant_id, run_id, thread_id, action)
        self.workers.cancel_everywhere(run_id)

    async def cancel_many(
        self,
        tenant_id: str,
        action: str,
        *,
        run_ids: list[str] | None = None,
        thread_id: str | None = None,
        assistant_id: str | None = None,
        statuses: tuple[str, ...] = ACTIVE,
    ) -> list[str]:
        """Cancel a tenant's active runs (by id, else every one with a status, of an
        assistant if given) wherever they execute; their ids."""
        cancelled = await self.store.runs.cancel_many(
            tenant_id,
            action,
            run_ids=run_ids,
            thread_id=thread_id,
            assistant_id=assistant_id,
            statuses=statuses,
        )
        for run_id in cancelled:
            self.workers.cancel_everywhere(run_id)
        return cancelled

    async def forget_assistant(self, tenant_id: str, assistant_id: str) -> None:
        """Before an assistant is deleted: its active runs are cancelled and waited for (a
        few seconds at most), then its runs are deleted, as LangGraph does."""
        cancelled = await self.cancel_many(tenant_id, "interrupt", assistant_id=assistant_id)
        ends = [self.wait({"run_id": r, "tenant_id": tenant_id}) for r in cancelled]
        if ends:
            with contextlib.suppress(TimeoutError):  # what is left is kept, not deleted
                await asyncio.wait_for(asyncio.gather(*ends), FORGET_WAIT_S)
        await self.store.runs.delete_of_assistant(tenant_id, assistant_id)

    async def finish_stateless(self, run: Mapping[str, Any], ended: bool = False) -> None:
        """Delete a stateless run's thread (unless kept) once the run is over (``ended``:
        it is known to be)."""
        if (run["kwargs"].get("on_completion") or "delete") == "delete":
            if not ended:
                await self.wait(run)
            await self.store.threads.delete(run["tenant_id"], run["thread_id"])

    async def discard(self, run: Mapping[str, Any], ended: bool = False) -> None:
        """Stop a run nobody will read (if still active), wait for its end, and delete its
        temporary thread; ``ended``: it is known to have ended (only the thread)."""
        if not ended:
            if await self.store.runs.status(run["run_id"]) in ACTIVE:
                await self.cancel(run["tenant_id"], run["run_id"], None)
            await self.wait(run)
        await self.store.threads.delete(run["tenant_id"], run["thread_id"])
