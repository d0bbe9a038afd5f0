"""Settings from the environment: an empty variable means unset."""

from __future__ import annotations

from pathlib import Path

import pytest

from nimbus.adapters.cli.server import _bootstrap_admin
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
    key = await _bootstrap_admin(Settings())
    assert key is not None and key.startswith("nmb_")
    assert await _bootstrap_admin(Settings()) is None  # printed once: there is one now
