"""``cl-release serve``: the gateway, and the vLLM command line and adapters behind it."""

from __future__ import annotations

import click

from .base import Context, OwnedChoice, echo_json, handle_errors, json_option, main, pass_ctx


def _backends():
    from ..serve.config import BACKENDS

    return BACKENDS


@main.group(invoke_without_command=True)
@click.option("--host", default=None, help="Address to listen on (default: serve.host, else 127.0.0.1).")
@click.option("--port", type=click.IntRange(0, 65535), default=None, help="Port (default: serve.port, else 8765; 0: any).")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Server processes on the one port (each with its own log writer and model).")
@click.option("--backend", type=OwnedChoice(_backends), default=None,
              help="What answers /v1/chat/completions (default: serve.backend, else local): the model in this "
                   "process, an OpenAI-compatible upstream such as vLLM, or none (collector only).")
@click.option("--upstream-url", default=None, metavar="URL",
              help="The openai backend's upstream, with /v1 (default: serve.upstream_url).")
@click.option("--verbose", is_flag=True, help="Log every request to stderr (secrets redacted).")
@click.pass_context
@handle_errors
def serve(click_ctx: click.Context, host: str | None, port: int | None, workers: int, backend: str | None,
          upstream_url: str | None, verbose: bool) -> None:
    """The gateway: OpenAI-compatible chat completions from the champion and the challenger
    (POST /v1/chat/completions, GET /v1/models), every answer captured; and the collector
    (POST /log, POST /feedback, GET /route, /stats, /health). OpenAPI at /openapi.json.

    Every request but /health and /openapi.json needs "Authorization: Bearer TOKEN". The
    token is read from the environment variable named by serve.token_env (default
    CL_RELEASE_TOKEN), never from the command line; the server refuses to start without it."""
    if click_ctx.invoked_subcommand is not None:
        return
    from ..serve import make_server

    ctx = click_ctx.find_object(Context)
    project = ctx.project()
    server = make_server(project, host=host, port=port, verbose=verbose, workers=workers, backend=backend,
                         upstream_url=upstream_url, warm=True, debug=ctx.debug)
    from ..serve import serve_config

    kind = backend or serve_config(project)["backend"]
    click.echo(f"cl-release gateway listening on {server.url} (backend {kind}, {workers} worker"
               f"{'s' if workers > 1 else ''}; OpenAPI: {server.url}/openapi.json)", err=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


@serve.command("vllm-command")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="vLLM's port (default: vLLM's 8000).")
@click.option("--repo-path", default=None, metavar="PATH",
              help="This repository's path on the vLLM machine (default: serve.upstream_repo_path, else here).")
@json_option
@pass_ctx
@handle_errors
def serve_vllm_command(ctx: Context, port: int | None, repo_path: str | None, as_json: bool) -> None:
    """Print the vllm serve line that serves the current champion and challenger as LoRA modules
    (v1.1.0=PATH ...), with runtime adapter updates on when serve.upstream_admin is."""
    from ..serve import serve_config
    from ..serve.vllm import format_command, vllm_command

    project = ctx.project()
    argv = vllm_command(project, port=port, repo_path=repo_path)
    admin = bool(serve_config(project).get("upstream_admin"))
    if as_json:
        echo_json({"argv": argv, "env": {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"} if admin else {}})
    else:
        click.echo(format_command(argv, runtime_updates=admin))


@serve.command("sync-adapters")
@json_option
@pass_ctx
@handle_errors
def serve_sync_adapters(ctx: Context, as_json: bool) -> None:
    """Make the upstream (serve.upstream_url) hold exactly the served versions' adapters:
    load the missing ones, unload the others (after a crash or a failed unload)."""
    from ..serve.vllm import admin_for

    out = admin_for(ctx.project()).sync(ctx.registry().load())
    if as_json:
        echo_json(out)
    else:
        click.echo(f"loaded: {', '.join(out['loaded']) or '-'}; unloaded: {', '.join(out['unloaded']) or '-'}")


@serve.command("openapi")
@handle_errors
def serve_openapi() -> None:
    """Print the gateway's OpenAPI document (JSON), as GET /openapi.json serves it."""
    from ..serve import openapi_spec

    click.echo(openapi_spec().decode())
