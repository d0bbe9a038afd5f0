"""The contract of :class:`nimbus.ports.AssistantStore`: an assistant is read by its
tenant alone, alike in memory, on SQLite and on PostgreSQL."""

from __future__ import annotations

from tests.ports.conftest import Backend


async def test_an_assistant_is_read_with_its_settings(store: Backend) -> None:
    config = {"configurable": {"model": "test:echo", "tools": ["calculator"]}}
    assistant_id = await store.assistant("t1", config=config)
    found = await store.store.assistants.get("t1", assistant_id)
    assert found is not None
    assert (found["assistant_id"], found["tenant_id"], found["graph_id"]) == (
        assistant_id,
        "t1",
        "agent",
    )
    assert (found["config"], found["context"], found["version"]) == (config, {}, 1)
    assert await store.store.assistants.get("t1", "no-such-assistant") is None


async def test_another_tenant_s_assistant_is_not_found(store: Backend) -> None:
    assistant_id = await store.assistant("t1", config={"configurable": {"model": "test:a"}})
    assert await store.store.assistants.get("t2", assistant_id) is None
    # ids are per tenant: the other tenant may have one of the same id, its own
    await store.assistant("t2", assistant_id, config={"configurable": {"model": "test:b"}})
    mine = await store.store.assistants.get("t1", assistant_id)
    theirs = await store.store.assistants.get("t2", assistant_id)
    assert mine is not None and theirs is not None
    assert mine["config"] == {"configurable": {"model": "test:a"}}
    assert theirs["config"] == {"configurable": {"model": "test:b"}}
