"""The `serve` command: an engine behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from salmonn_export.cli.common import (
    DeviceOpt,
    EngineOpt,
    app,
    engine_path,
    err,
    handle_errors,
)
from salmonn_export.errors import SalmonnError


@app.command()
@handle_errors
def serve(
    engine: EngineOpt = None,
    host: Annotated[str, typer.Option(help="Bind address (localhost by default; 0.0.0.0 exposes it).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    max_batch: Annotated[int, typer.Option(help="Most requests run together in one batch.")] = 4,
    max_wait_ms: Annotated[float, typer.Option(help="How long a batch waits to fill up.")] = 10.0,
    max_queue: Annotated[int, typer.Option(help="Queued requests before answering 503.")] = 64,
    max_upload_mb: Annotated[float, typer.Option(help="Largest upload (413 above).")] = 25.0,
    max_audio_seconds: Annotated[float, typer.Option(help="Longest audio (413 above).")] = 30.0,
    request_timeout_s: Annotated[float, typer.Option(help="Per-request timeout (504).")] = 120.0,
    api_key_env: Annotated[str | None, typer.Option(help="Name of an environment variable holding the API key; "
                                                         "requests then need Authorization: Bearer <key>.")] = None,
    ray: Annotated[bool, typer.Option("--ray", help="Deploy on Ray Serve (one engine per replica).")] = False,
    replicas: Annotated[int, typer.Option(help="Ray Serve replicas (with --ray).")] = 1,
    autoscale: Annotated[str | None, typer.Option(help="MIN:MAX replicas, autoscaled by ongoing requests (with --ray).")] = None,
    ray_address: Annotated[str | None, typer.Option(help="Join this Ray cluster (default: start a local one).")] = None,
    device: DeviceOpt = "cpu",
):
    """Serve an engine behind an OpenAI-compatible audio API with dynamic batching and Prometheus metrics.

    Example: salmonn-export serve --engine engines/demo-w4a16 --port 8000
    """
    import uvicorn

    from salmonn_export.serve.app import ServeSettings, create_app

    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise SalmonnError(f"--api-key-env {api_key_env}: that environment variable is empty or unset")
    if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
        raise SalmonnError("need --max-batch >= 1, --max-queue >= 1, --max-wait-ms >= 0")
    settings = ServeSettings(engine=engine_path(engine), device=device, max_batch=max_batch, max_wait_ms=max_wait_ms,
                             max_queue=max_queue, max_upload_mb=max_upload_mb, max_audio_seconds=max_audio_seconds,
                             request_timeout_s=request_timeout_s, api_key=api_key)
    err.print(f"serving {settings.engine} on http://{host}:{port} (POST /v1/audio/transcriptions, /v1/audio/captions)")
    if ray:
        from salmonn_export.serve.ray_backend import parse_autoscale, run_ray_serve

        if replicas < 1:
            raise SalmonnError("--replicas must be >= 1")
        run_ray_serve(settings, host, port, replicas, parse_autoscale(autoscale), ray_address)
        return
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning")
