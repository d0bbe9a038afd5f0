"""Model adapters, chosen by model id ``provider:name``.

- ``local:smollm2`` (default) or ``local:/path/to/model.gguf`` — llama.cpp in-process
- ``openai:<model>`` — any OpenAI-compatible chat-completions endpoint
- ``test:echo`` — a deterministic model shipped for tests and examples
"""

from __future__ import annotations

import re

from nimbus.core.model import MAX_MODEL_ID, Model
from nimbus.exceptions import ConfigError
from nimbus.settings import Settings

PROVIDERS = ("local", "openai", "test")
TEST_MODELS = ("echo",)  #: the test models a model id can name (``test:echo``)
# A model name: printable ASCII without spaces (gpt-4o-mini, llama3.2:latest, org/model,
# ft:gpt-4o:org::id); what an endpoint calls its models, nothing a URL or header could smuggle.
_MODEL_NAME = re.compile(r"[!-~]+")


def check_model_id(model_id: str) -> tuple[str, str]:
    """``(provider, name)`` of a well-formed model id, else :class:`ConfigError` saying what
    is wrong: ``provider:name`` with a known provider and a non-empty name (a known one for
    ``test:``). Checked before a model is built, so that a bad id is a 4xx when an assistant
    or run names it, never a run that cannot start."""
    if not isinstance(model_id, str) or len(model_id) > MAX_MODEL_ID:
        raise ConfigError(f"a model id is a string of at most {MAX_MODEL_ID} characters")
    provider, sep, name = model_id.partition(":")
    if not sep or not name:
        raise ConfigError(
            f"unknown model {model_id!r}: a model id must look like 'provider:name' (providers: "
            f"{', '.join(PROVIDERS)}), e.g. 'local:smollm2' or 'openai:gpt-4o-mini'"
        )
    if provider not in PROVIDERS:
        raise ConfigError(
            f"unknown model {model_id!r}: unknown model provider {provider!r}; providers: "
            f"{', '.join(PROVIDERS)}"
        )
    # a local model may be a file path (spaces and all); other names are the endpoint's
    if not (name.isprintable() if provider == "local" else _MODEL_NAME.fullmatch(name)):
        raise ConfigError(f"model id {model_id!r}: the name may not contain spaces or controls")
    if provider == "test" and name not in TEST_MODELS:
        known = ", ".join(f"test:{n}" for n in TEST_MODELS)
        raise ConfigError(f"unknown test model {model_id!r}; test models: {known}")
    return provider, name


def resolve_model(model_id: str, settings: Settings, *, base_url: str | None = None) -> Model:
    """Build the model that ``model_id`` names; unknown ids raise :class:`ConfigError`."""
    provider, name = check_model_id(model_id)
    if provider == "openai":
        from nimbus.adapters.llm.openai import OpenAIModel

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
        from nimbus.adapters.llm.local import LocalModel

        return LocalModel.shared(
            name, threads=settings.local_threads, context_tokens=settings.local_context_tokens
        )
    from nimbus.adapters.llm.test import FunctionModel, echo

    return FunctionModel(echo, model_id=model_id)  # test:echo, the one test model


class ModelCatalog:
    """The operator's models (:class:`nimbus.ports.ModelCatalog`), from the settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.default = settings.default_model

    def check(self, model_id: str) -> tuple[str, str]:
        """See :func:`check_model_id`."""
        return check_model_id(model_id)

    def build(self, model_id: str) -> Model:
        """See :func:`resolve_model`."""
        return resolve_model(model_id, self.settings)
