"""Settings from the environment: an empty variable means unset."""

from __future__ import annotations

from pathlib import Path

import pytest

from nimbus.adapters.api.app import _admin_key
from nimbus.adapters.store.database import Database
from nimbus.settings import Settings


def test_an_empty_variable_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NIMBUS_ADMIN_KEY", "")
    monkeypatch.setenv("OPENAI_API_KEY", "")
    monkeypatch.setenv("NIMBUS_WORKERS", "")
    settings = Settings()
    assert settings.admin_key is None
    assert settings.openai_api_key is None
    assert settings.workers == Settings.model_fields["workers"].default


async def test_an_empty_admin_key_still_gets_an_admin_key_printed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # `NIMBUS_ADMIN_KEY=` used to bootstrap the empty string, which no request can send:
    # the first start then printed no key, and nobody could administer the server.
    monkeypatch.setenv("NIMBUS_ADMIN_KEY", "")
    monkeypatch.setenv("NIMBUS_DATABASE_URL", f"sqlite:///{tmp_path}/nimbus.db")
    settings = Settings()
    printed: list[str | None] = []
    db = await Database.open(settings.database_url)
    try:
        await _admin_key(settings, db, printed.append)
        await _admin_key(settings, db, printed.append)
        key, again = printed
        assert key is not None and key.startswith("nmb_")
        assert again is None  # printed once: there is one now
        assert await db.keys.authenticate(key) is not None
    finally:
        await db.close()
