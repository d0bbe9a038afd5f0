"""The agent core: messages, events, agent specs, model and tool interfaces, the run loop.

Nothing here imports a web framework, database driver, HTTP client or LLM SDK
(``tests/core/test_imports.py`` checks it); adapters live in ``nimbus.adapters.llm``,
``nimbus.adapters.tools`` and ``nimbus.adapters.cli``.
"""
