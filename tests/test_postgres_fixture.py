"""The throwaway PostgreSQL cluster that tests start when no server answers."""

from __future__ import annotations

import asyncio

import asyncpg

from tests.postgres import answers, throwaway_cluster


def test_throwaway_cluster_starts_answers_and_goes_away() -> None:
    with throwaway_cluster() as url:
        assert asyncio.run(answers(url))

        async def version() -> str:
            conn = await asyncpg.connect(url)
            try:
                return str(await conn.fetchval("SHOW server_version"))
            finally:
                await conn.close()

        assert asyncio.run(version())[0].isdigit()
    assert not asyncio.run(answers(url))
