"""Every exception Nimbus raises, in one tree.

```
NimbusError                      base: everything below carries context, none logs itself
├── UserError                    the caller's input or configuration is wrong (→ 4xx, CLI exit 2)
│   ├── ConfigError              bad settings, agent file, unknown model id or tool name
│   ├── ToolDefinitionError      a Python function that cannot become a tool
│   ├── NotAllowed               well-formed, but not allowed to this caller (→ 403)
│   └── NotFound                 no such thread, assistant or run for this caller (→ 404)
├── ModelError                   a model provider failed
│   ├── ModelHTTPError           the endpoint answered with an error status
│   ├── ModelConnectionError     the endpoint could not be reached / timed out
│   └── ModelResponseError       the endpoint answered something we cannot parse
├── Refused                      well-formed, but the state refuses it now (→ 409 / 429)
│   ├── ThreadBusy               the thread has an active run (multitask_strategy reject)
│   ├── IdempotencyConflict      an Idempotency-Key was used before with another request
│   └── QueueFull                the tenant has as many runs waiting as it may
├── ToolError                    raised *by* a tool to tell the model what went wrong
├── RunFailed                    a run ended without a final answer (limit, timeout, errors)
└── LeaseLost                    a worker's lease on a run was taken over: it may not write
```

Signals that steer the loop (a malformed tool call, a tool that raised) never escape as
exceptions: the runtime turns them into tool-result messages the model can correct.
"""

from __future__ import annotations


class NimbusError(Exception):
    """Base class of every Nimbus exception."""


class UserError(NimbusError):
    """The caller's input or configuration is wrong; the message says how."""


class ConfigError(UserError):
    """Invalid settings, agent spec, model id or tool name."""


class ToolDefinitionError(UserError):
    """A Python callable that cannot be turned into a tool."""


class NotAllowed(UserError):
    """A well-formed request that its caller may not make: a run widening its assistant's
    tools, a read-only key asking for something that changes state."""


class NotFound(UserError):
    """No such object for this caller: missing, or another tenant's (the same answer)."""

    def __init__(self, what: str, id: str) -> None:
        super().__init__(f"{what} {id!r} not found")
        self.what, self.id = what, id


class ModelError(NimbusError):
    """A model provider failed; ``endpoint`` names which one.

    Tenants read the message (a run's error, the OpenAI facade's 502): a provider builds it,
    and ``endpoint``, without the operator's secrets (see :mod:`nimbus.adapters.llm.redact`).
    """

    def __init__(self, message: str, *, endpoint: str = "") -> None:
        super().__init__(message)
        self.endpoint = endpoint


class ModelHTTPError(ModelError):
    """The model endpoint answered with an HTTP error status; ``body`` is the start of what
    it said, redacted like the message."""

    def __init__(self, message: str, *, endpoint: str, status: int, body: str = "") -> None:
        super().__init__(message, endpoint=endpoint)
        self.status = status
        self.body = body


class ModelConnectionError(ModelError):
    """The model endpoint could not be reached or did not answer in time."""


class ModelResponseError(ModelError):
    """The model endpoint answered something that is not a valid completion."""


class Refused(NimbusError):
    """A well-formed request that the state of things refuses now; ``args[0]`` names what
    (the thread, the key, the tenant)."""


class ThreadBusy(Refused):
    """A run was refused because the thread already has an active run."""


class IdempotencyConflict(Refused):
    """An Idempotency-Key was used before with another request."""


class QueueFull(Refused):
    """A run was refused: its tenant has as many runs waiting as it may (see
    :mod:`nimbus.adapters.store.quota`)."""


class ToolError(NimbusError):
    """Raised by a tool to return a clean error message to the model."""


class RunFailed(NimbusError):
    """A run ended without a final answer.

    ``reason`` is a short machine-readable code (``max_steps``, ``timeout``,
    ``token_budget``, ``tool_call_errors``, ``model_error``); ``run_id`` and ``step``
    say where it stopped.
    """

    def __init__(self, message: str, *, reason: str, run_id: str = "", step: int = 0) -> None:
        super().__init__(message)
        self.reason = reason
        self.run_id = run_id
        self.step = step


class LeaseLost(NimbusError):
    """A worker's lease on a run expired or was taken over (it paused, or lost the database
    for longer than the lease): its writes are refused, another worker resumes the run."""

    def __init__(self, run_id: str, token: int) -> None:
        super().__init__(f"lease on run {run_id} (token {token}) is no longer held")
        self.run_id = run_id
        self.token = token
