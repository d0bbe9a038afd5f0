"""Structured logs (structlog): JSON by default, ``console`` for humans. Keys never logged."""

from __future__ import annotations

import logging

import structlog


def configure_logging(fmt: str = "json", level: int = logging.INFO) -> None:
    """Route structlog (and stdlib logging) to stderr in ``fmt``."""
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer() if fmt == "console" else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
