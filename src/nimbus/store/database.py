"""One handle on the database: the engine and a store per resource."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from nimbus.store.assistants import AssistantStore
from nimbus.store.db import create_engine, migrate
from nimbus.store.items import ItemStore
from nimbus.store.keys import KeyStore
from nimbus.store.runs import RunStore
from nimbus.store.threads import ThreadStore
from nimbus.store.writer import StepWriter


class Database:
    """The engine plus the assistant, thread, run, item and key stores."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.assistants = AssistantStore(engine)
        self.threads = ThreadStore(engine)
        self.runs = RunStore(engine)
        self.items = ItemStore(engine)
        self.keys = KeyStore(engine)
        self.steps = StepWriter(engine)

    @classmethod
    async def open(cls, url: str, *, run_migrations: bool = True) -> Database:
        """Connect to ``url`` and bring its schema up to date."""
        engine = create_engine(url)
        if run_migrations:
            await migrate(engine)
        return cls(engine)

    async def close(self) -> None:
        """Finish queued step writes, then close every connection."""
        await self.steps.close()
        await self.engine.dispose()
