"""Prometheus metrics of the server, workers, models and tools."""

from __future__ import annotations

from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

M = TypeVar("M", Counter, Histogram)


class Metrics:
    """Every Nimbus metric, in one registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            "nimbus_http_requests_total", "HTTP requests", ["method", "route", "status"], registry=r
        )
        self.http_seconds = Histogram(
            "nimbus_http_request_seconds", "HTTP request latency", ["method", "route"], registry=r
        )
        self.runs = Counter("nimbus_runs_total", "Finished runs by status", ["status"], registry=r)
        self.run_seconds = Histogram("nimbus_run_seconds", "Run duration", registry=r)
        self.steps = Counter("nimbus_steps_total", "Completed agent steps", registry=r)
        self.model_seconds = Histogram(
            "nimbus_model_request_seconds", "Model call latency", ["model"], registry=r
        )
        self.tokens = Counter(
            "nimbus_model_tokens_total",
            "Tokens by model and direction",
            ["model", "direction"],
            registry=r,
        )
        self.tool_seconds = Histogram(
            "nimbus_tool_seconds", "Tool call latency", ["tool"], registry=r
        )
        self.tool_errors = Counter(
            "nimbus_tool_errors_total", "Tool calls that failed", ["tool"], registry=r
        )
        self.queue_depth = Gauge("nimbus_queue_depth", "Runs waiting for a worker", registry=r)
        self.running = Gauge("nimbus_runs_running", "Runs executing now", registry=r)
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}

    def of(self, metric: M, *labels: str) -> M:
        """``metric.labels(*labels)``, remembered: prometheus_client checks and converts the
        labels and takes a lock at every call, and these are taken several times per run."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child


METRICS = Metrics()
