"""Model adapters, chosen by model id ``provider:name``.

- ``local:smollm2`` (default) or ``local:/path/to/model.gguf`` — llama.cpp in-process
- ``openai:<model>`` — any OpenAI-compatible chat-completions endpoint
- ``test:echo`` — a deterministic model shipped for tests and examples
"""

from __future__ import annotations

from nimbus.core.model import Model
from nimbus.exceptions import ConfigError
from nimbus.settings import Settings

PROVIDERS = ("local", "openai", "test")


def resolve_model(model_id: str, settings: Settings, *, base_url: str | None = None) -> Model:
    """Build the model that ``model_id`` names; unknown ids raise :class:`ConfigError`."""
    provider, sep, name = model_id.partition(":")
    if not sep or not name:
        raise ConfigError(
            f"model id {model_id!r} must look like 'provider:name' (providers: "
            f"{', '.join(PROVIDERS)}), e.g. 'local:smollm2' or 'openai:gpt-4o-mini'"
        )
    if provider == "openai":
        from nimbus.models.openai import OpenAIModel

        key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
        return OpenAIModel(
            name,
            base_url=base_url or settings.openai_base_url,
            api_key=key,
            timeout_s=settings.model_timeout_s,
            connect_timeout_s=settings.model_connect_timeout_s,
            max_retries=settings.model_max_retries,
            max_connections=settings.model_max_connections,
            max_response_bytes=settings.model_max_response_bytes,
        )
    if base_url is not None:
        raise ConfigError(f"--base-url only applies to openai: models, not {model_id!r}")
    if provider == "local":
        from nimbus.models.local import LocalModel

        return LocalModel.shared(
            name, threads=settings.local_threads, context_tokens=settings.local_context_tokens
        )
    if provider == "test":
        from nimbus.models.test import FunctionModel, echo

        if name == "echo":
            return FunctionModel(echo, model_id=model_id)
        raise ConfigError(f"unknown test model {model_id!r}; test models: test:echo")
    raise ConfigError(
        f"unknown model provider {provider!r} in {model_id!r}; providers: {', '.join(PROVIDERS)}"
    )
