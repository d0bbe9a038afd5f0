"""Tools for tests of crashes and take-overs (``NIMBUS_TOOL_MODULES='["nimbus.testing.tools"]'``).

Each call waits ``NIMBUS_TEST_TOOL_SLEEP`` seconds (default 1) and appends ``start <note>``
and ``end <note>`` lines, with the process id, to the file ``NIMBUS_TEST_TOOL_LOG`` names, so
a test counts how often a tool really ran, in which process, and whether it finished.
"""

from __future__ import annotations

import asyncio
import os

from nimbus.core.tool import Tool


def _record(what: str) -> None:
    path = os.environ.get("NIMBUS_TEST_TOOL_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as log:
            log.write(f"{what} pid={os.getpid()}\n")


async def slow_step(note: str) -> str:
    """Take a while, then say it is done (safe to repeat).

    Args:
        note: Anything; recorded and echoed.
    """
    _record(f"start {note}")
    await asyncio.sleep(float(os.environ.get("NIMBUS_TEST_TOOL_SLEEP", "1")))
    _record(f"end {note}")
    return f"done {note}"


async def slow_payment(note: str) -> str:
    """Take a while, then say the payment went through (never safe to repeat).

    Args:
        note: Anything; recorded and echoed.
    """
    _record(f"start {note}")
    await asyncio.sleep(float(os.environ.get("NIMBUS_TEST_TOOL_SLEEP", "1")))
    _record(f"end {note}")
    return f"paid {note}"


TOOLS = [
    Tool.from_function(slow_step, idempotent=True),
    Tool.from_function(slow_payment, idempotent=False),
]
