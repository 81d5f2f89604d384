"""`fundus-sdk serve` and `fundus-sdk keys`: the index over HTTP (the `serve` extra)."""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import asdict

import click

from ..keys import SCOPES, create_key
from .common import handle_errors


@click.command()
@click.argument("index_dir", metavar="INDEX", type=click.Path(file_okay=False, exists=True))
@click.option("--keys", "keys_file", required=True, type=click.Path(dir_okay=False),
              help="The API key file (`fundus-sdk keys create`); a key created while serving works at once.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Where to listen; behind the hospital's TLS proxy, keep the default.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64), help="Processes, each with the model and index opened once.")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(1, 64), help="Requests each worker works on at once.")
@click.option("--queue", default=16, show_default=True, type=click.IntRange(0, 10_000),
              help="Requests each worker lets wait; beyond that the answer is 503 with Retry-After.")
@click.option("--model", "model_path", type=click.Path(dir_okay=False), help="ONNX model file (default: the index's, the bundled one).")
@handle_errors
def serve(index_dir, keys_file, host, port, workers, threads, queue, model_path) -> None:
    """Serve the index INDEX over HTTP: search by photograph or descriptor, read cases, a page to try it.

    OpenAPI at /openapi.json; health at /livez and /readyz (no key); Prometheus metrics at
    /metrics (admin key); one audit line per request on stderr. Ctrl-C or SIGTERM drains the
    requests in flight, then stops.

    \b
    Example:
      fundus-sdk keys create --keys keys.jsonl --scope search
      fundus-sdk serve cases/ --keys keys.jsonl --port 8000
      curl -H "Authorization: Bearer KEY" -F image=@photo.jpg "http://127.0.0.1:8000/v1/search?k=5"
    """
    try:
        import uvicorn

        from ..serve import CONFIG_ENV, ServeConfig, create_app
    except ImportError as exc:
        raise click.ClickException(f"serving needs the serve extra ({exc.name} is missing): pip install 'fundus-sdk[serve]'") from None
    cores = len(os.sched_getaffinity(0))
    config = ServeConfig(str(index_dir), str(keys_file), model_path, threads, queue, max(1, cores // workers))
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if workers == 1:
        uvicorn.run(create_app(config), host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)
        return
    os.environ[CONFIG_ENV] = json.dumps(asdict(config))
    uvicorn.run("fundus_sdk.serve:app_from_environment", factory=True, host=host, port=port, workers=workers,
                log_level="warning", timeout_graceful_shutdown=30)  # fmt: skip


@click.group()
def keys() -> None:
    """API keys for `fundus-sdk serve`."""


@keys.command("create")
@click.option("--keys", "keys_file", required=True, type=click.Path(dir_okay=False), help="The key file (made owner-only).")
@click.option("--scope", type=click.Choice(SCOPES), default="search", show_default=True,
              help="search: search and read cases; admin: everything, the metrics included.")
@handle_errors
def keys_create(keys_file, scope) -> None:
    """Make a new API key: printed once on stdout, only its hash is kept.

    \b
    Example:
      fundus-sdk keys create --keys keys.jsonl --scope search
    """
    key, secret = create_key(keys_file, scope)
    click.echo(secret)
    click.echo(f"created key {key.id} ({key.scope}) in {keys_file}; it is shown only now", err=True)
