"""PostgreSQL for the tests: the one configured, or a throwaway cluster started from the
installed binaries (as pytest-postgresql does). PostgreSQL tests never skip: without a server
and without binaries they fail."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def answers(url: str) -> bool:
    try:
        conn = await asyncio.wait_for(asyncpg.connect(url), 3)
    except Exception:
        return False
    await conn.close()
    return True


def pg_bin(name: str) -> str:
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None
    )
    if not found:
        pytest.fail(
            f"no PostgreSQL answers and {name} is not installed: install postgresql "
            "(Debian: apt-get install postgresql) or set NIMBUS_TEST_POSTGRES_URL"
        )
    return found


class Cluster:
    """A PostgreSQL cluster in a temp dir on a free port (as pytest-postgresql does), which a
    test can stop and start again."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="nimbus-pg-"))
        self.data, self.port = self.base / "data", free_port()
        self.user_args: list[str] = []
        if os.geteuid() == 0:  # initdb refuses to run as root: use the postgres account
            shutil.chown(self.base, "postgres")
            self.user_args = ["runuser", "-u", "postgres", "--"]
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        subprocess.run(
            [
                *self.user_args,
                pg_bin("initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
            ],
            check=True,
            capture_output=True,
        )

    def _ctl(self, *args: str, check: bool = True) -> None:
        subprocess.run(
            [*self.user_args, pg_bin("pg_ctl"), "-D", str(self.data), *args],
            check=check,
            capture_output=True,
        )

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._ctl("-w", "-l", str(self.base / "log"), "-o", options, "start")

    def stop(self, mode: str = "immediate") -> None:
        """Stop the server (``immediate``: like a crash, no shutdown checkpoint)."""
        self._ctl("-m", mode, "stop", check=False)

    def remove(self) -> None:
        """Stop the server and delete the cluster."""
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


@contextlib.contextmanager
def throwaway_cluster() -> Iterator[str]:
    """A started :class:`Cluster`'s URL, removed at exit."""
    cluster = Cluster()
    try:
        cluster.start()
        yield cluster.url
    finally:
        cluster.remove()
