"""The core imports no web framework, database driver, HTTP client or LLM SDK."""

from __future__ import annotations

import json
import subprocess
import sys

CORE_MODULES = [
    "nimbus.core",
    "nimbus.core.messages",
    "nimbus.core.events",
    "nimbus.core.agent",
    "nimbus.core.model",
    "nimbus.core.tool",
    "nimbus.core.checkpoint",
    "nimbus.core.runtime",
    "nimbus.exceptions",
]
FORBIDDEN = [
    "aiohttp",
    "httptools",
    "httpx",
    "httpcore",
    "requests",
    "urllib3",
    "openai",
    "llama_cpp",
    "fastapi",
    "starlette",
    "uvicorn",
    "sqlalchemy",
    "asyncpg",
    "psycopg",
    "redis",
    "typer",
    "rich",
    "nimbus.adapters.llm",
    "nimbus.adapters.tools",
    "nimbus.adapters.cli",
    "nimbus.testing",
    "nimbus.bench",
]


def test_core_imports_no_adapters() -> None:
    code = (
        "import importlib, json, sys\n"
        f"for m in {CORE_MODULES!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout)
    bad = sorted(m for m in loaded for f in FORBIDDEN if m == f or m.startswith(f + "."))
    assert "nimbus.core.runtime" in loaded
    assert bad == [], f"the core pulled in adapter modules: {bad}"


def test_the_check_detects_a_forbidden_import() -> None:
    """Guard against a vacuous test: importing an adapter is seen."""
    code = "import sys, nimbus.adapters.llm.openai; print('httptools' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
