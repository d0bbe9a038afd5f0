"""The processes ``nimbus bench server`` starts and watches: ``nimbus serve``, a fresh
PostgreSQL database, and the CPU time of processes, read from /proc."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from nimbus.exceptions import UserError

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
# Titles of the PostgreSQL processes that serve the whole cluster (not one database).
_PG_AUX = (
    "checkpointer",
    "background writer",
    "walwriter",
    "autovacuum",
    "logical replication",
    "stats collector",
    "archiver",
    "walsender",
)

# --- process CPU from /proc -------------------------------------------------------------


def proc_rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid``, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _postgres_title(pid: int) -> str | None:
    """The title of process ``pid`` if it is a PostgreSQL process, else ``None``."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            title = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
    argv0 = title.split(" ", 1)[0]
    if title.startswith("postgres:") or argv0.endswith("/postgres") or argv0 == "postgres":
        return title
    return None


PgKind = Literal["backend", "aux", "other"]


def _pg_kind(title: str, database: str) -> PgKind:
    """A backend of ``database``, one of the cluster's shared processes, or anything else."""
    if f" {database} " in f"{title} ":
        return "backend"
    if not title.startswith("postgres:") or any(name in title for name in _PG_AUX):
        return "aux"  # the postmaster, WAL writer, checkpointer, …
    return "other"  # a backend of another database


class PostgresCPUMeter:
    """CPU time of a local PostgreSQL over a window: the backends of one database, and the
    cluster's shared processes (postmaster, WAL writer, checkpointer, …: shared with every
    database). Backends of other databases are left out.

    Backends come and go within a window (a pool closes its overflow connections), and an
    ended process's CPU can no longer be read: call :meth:`sample` often (a few times a
    second) so that such a backend still counts up to its last sample.
    """

    def __init__(self, database: str) -> None:
        self.database = database
        self._kinds: dict[int, PgKind] = {}
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._started = False

    def start(self) -> None:
        """Begin the window: what each process has used so far is not counted."""
        self._first.clear()
        self._last.clear()
        self._started = False
        self.sample()
        self._first = dict(self._last)
        self._started = True

    def sample(self) -> None:
        """Read the CPU time of every PostgreSQL process now."""
        pids = set(map(int, filter(str.isdigit, os.listdir("/proc"))))
        for pid in pids - self._kinds.keys():
            title = _postgres_title(pid)
            self._kinds[pid] = "other" if title is None else _pg_kind(title, self.database)
        for pid in pids:
            if self._kinds[pid] == "other":
                continue
            try:
                cpu = proc_cpu_s(pid)
            except (OSError, IndexError, ValueError):
                continue  # ended meanwhile
            self._last[pid] = cpu
            if self._started:
                self._first.setdefault(pid, 0.0)  # started within the window

    @property
    def backends_seen(self) -> int:
        """How many backends of the database were seen in the window."""
        return sum(1 for pid in self._last if self._kinds[pid] == "backend")

    def seconds(self, kind: PgKind) -> float:
        """CPU seconds used in the window by the processes of ``kind``."""
        return sum(
            cpu - self._first.get(pid, cpu)
            for pid, cpu in self._last.items()
            if self._kinds[pid] == kind
        )


def pin(pid: int, cpu: int) -> None:
    """Pin every thread of process ``pid`` to ``cpu`` (threads started later inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), {cpu})


# --- databases and the server process ---------------------------------------------------


async def _pg_admin(url: str, sql: str) -> None:
    import asyncpg

    conn = await asyncio.wait_for(asyncpg.connect(url), 5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def check_postgres(url: str) -> None:
    """Raise :class:`UserError` unless a PostgreSQL server answers at ``url``."""
    try:
        asyncio.run(_pg_admin(url, "SELECT 1"))
    except Exception as exc:
        where = url.split("@")[-1]
        raise UserError(
            f"no PostgreSQL answers at {where} ({type(exc).__name__}: {exc}); start one, pass "
            "--postgres-url or NIMBUS_TEST_POSTGRES_URL, or use --database sqlite"
        ) from None


@contextlib.contextmanager
def fresh_postgres_database(admin_url: str) -> Iterator[tuple[str, str]]:
    """A new database ``nimbus_bench_<random>`` on ``admin_url``'s server, dropped afterwards.

    Yields ``(url, name)``.
    """
    name = "nimbus_bench_" + secrets.token_hex(6)
    asyncio.run(_pg_admin(admin_url, f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.rsplit("/", 1)[0] + "/" + name, name
    finally:
        asyncio.run(_pg_admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def is_local(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return host in ("", "localhost", "127.0.0.1", "::1") or host.startswith("/")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class NimbusServer:
    """A running ``nimbus serve``."""

    url: str
    admin_key: str
    process: subprocess.Popen[bytes]
    log: Path

    def log_tail(self, chars: int = 4000) -> str:
        """The end of its log."""
        return self.log.read_text(errors="replace")[-chars:]


@contextlib.contextmanager
def nimbus_server(
    database_url: str,
    model_base_url: str,
    cpu: int | None,
    workdir: Path,
    command: tuple[str, ...] = ("serve",),
    admin_key: str | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[NimbusServer]:
    """Start ``python -m nimbus serve`` (or ``command``, such as ``("worker",)``; logs at
    INFO, JSON, to a file) and wait until it listens.

    It runs in ``workdir`` so that no ``.env`` file of the caller's directory is read.
    """
    port = free_port()
    admin_key = admin_key or "nmb_bench_" + secrets.token_hex(16)
    log = workdir / f"server-{port}.log"
    src = str(Path(__file__).resolve().parents[2])  # the child imports this very package
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p),
        "NIMBUS_DATABASE_URL": database_url,
        "NIMBUS_ADMIN_KEY": admin_key,
        "OPENAI_BASE_URL": model_base_url,
        "OPENAI_API_KEY": "bench",
        "NIMBUS_DEFAULT_MODEL": "openai:fake-model",
        "NIMBUS_MODEL_MAX_RETRIES": "0",
        **(env or {}),
    }
    cmd = [sys.executable, "-m", "nimbus", *command, "--port", str(port), "--log-format", "json"]
    with log.open("wb") as out:
        process = subprocess.Popen(
            cmd, env=environment, cwd=workdir, stdout=out, stderr=subprocess.STDOUT
        )
    server = NimbusServer(f"http://127.0.0.1:{port}", admin_key, process, log)
    try:
        if cpu is not None:
            pin(process.pid, cpu)
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"nimbus serve exited with code {process.returncode}:\n{server.log_tail()}"
                )
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"nimbus serve did not listen within 60 s:\n{server.log_tail()}"
                    ) from None
                time.sleep(0.05)
        if cpu is not None:
            pin(process.pid, cpu)  # the threads it started meanwhile
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
