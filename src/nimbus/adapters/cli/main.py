"""The ``nimbus`` command line: ``run``, ``chat`` and ``bench``.

Errors are one line on stderr with a non-zero exit: 2 for bad usage or configuration,
1 for a run that failed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from nimbus.adapters.cli.bench import bench_app
from nimbus.adapters.cli.server import assistants_app, keys_app, serve, worker
from nimbus.aio import run_async
from nimbus.exceptions import NimbusError, RunFailed, UserError

app = typer.Typer(
    name="nimbus",
    help="Nimbus: run LLM agents locally or as a service.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
app.add_typer(bench_app, name="bench")
app.add_typer(keys_app, name="keys")
app.add_typer(assistants_app, name="assistants")
app.command("serve")(serve)
app.command("worker")(worker)

ModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", help="Model id, e.g. local:smollm2, openai:gpt-4o-mini."),
]
AgentOpt = Annotated[
    Path | None, typer.Option("--agent", "-a", help="Agent spec file (.yaml, .toml or .json).")
]
BaseUrlOpt = Annotated[
    str | None,
    typer.Option("--base-url", help="Base URL of the OpenAI-compatible endpoint (openai: models)."),
]


@app.command()
def run(
    prompt: Annotated[str, typer.Argument(help="What to ask the agent.")],
    model: ModelOpt = None,
    agent: AgentOpt = None,
    base_url: BaseUrlOpt = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the final result (messages, usage…) as JSON.")
    ] = False,
    url: Annotated[
        str | None, typer.Option(help="Run on this Nimbus server instead of in-process.")
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="NIMBUS_API_KEY", help="API key for --url.")
    ] = None,
    assistant: Annotated[
        str | None, typer.Option(help="Assistant id or name on the server (with --url).")
    ] = None,
) -> None:
    """Run one agent turn (in-process, or on a server with --url) and stream the answer."""
    if url is not None:
        from nimbus.adapters.cli.remote import run_remote

        if model or base_url:
            raise UserError(
                "--model and --base-url are the server's business with --url; "
                "use --assistant or --agent"
            )
        raise typer.Exit(
            run_async(
                run_remote(
                    url,
                    api_key,
                    prompt,
                    assistant=assistant,
                    agent_file=agent,
                    json_output=json_output,
                )
            )
        )
    if assistant is not None:
        raise UserError("--assistant needs --url")
    from nimbus.adapters.cli.session import Session

    session = Session.create(model=model, agent_file=agent, base_url=base_url)
    code = run_async(session.run_once(prompt, json_output=json_output))
    raise typer.Exit(code)


@app.command()
def chat(
    model: ModelOpt = None,
    agent: AgentOpt = None,
    base_url: BaseUrlOpt = None,
) -> None:
    """Chat with an agent in the terminal (Ctrl-D or /exit to leave, /reset to start over)."""
    from nimbus.adapters.cli.session import Session

    session = Session.create(model=model, agent_file=agent, base_url=base_url)
    raise typer.Exit(run_async(session.chat()))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``nimbus`` script; returns the exit code."""
    try:
        app(args=argv, prog_name="nimbus", standalone_mode=False)
    except typer.Exit as exc:
        return int(exc.exit_code)
    except typer.Abort:
        print("nimbus: aborted", file=sys.stderr)
        return 130
    except typer.TyperException as exc:  # usage errors: bad flags, missing arguments
        format_message = getattr(exc, "format_message", None)
        message = format_message() if callable(format_message) else str(exc)
        ctx = getattr(exc, "ctx", None)
        hint = f" (try '{ctx.command_path} --help')" if ctx is not None else ""
        print(f"nimbus: error: {message}{hint}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 2))
    except RunFailed as exc:
        print(f"nimbus: run failed ({exc.reason}): {exc}", file=sys.stderr)
        return 1
    except UserError as exc:
        print(f"nimbus: error: {exc}", file=sys.stderr)
        return 2
    except NimbusError as exc:
        print(f"nimbus: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("nimbus: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
