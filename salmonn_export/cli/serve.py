"""The `serve` command: an engine behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Annotated

import typer

from salmonn_export.cli.common import (
    BATCH_MAX,
    COUNT_MAX,
    WORKERS_MAX,
    DeviceOpt,
    EngineOpt,
    app,
    bounded,
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
    port: Annotated[int, typer.Option(callback=bounded(1, 65535), help="TCP port.")] = 8000,
    max_batch: Annotated[int, typer.Option(callback=bounded(1, BATCH_MAX), help="Most requests run together in one batch.")] = 4,
    max_wait_ms: Annotated[float, typer.Option(callback=bounded(0), help="How long a batch waits to fill up.")] = 10.0,
    max_queue: Annotated[int, typer.Option(callback=bounded(1, COUNT_MAX), help="Queued requests before answering 503.")] = 64,
    max_upload_mb: Annotated[float, typer.Option(callback=bounded(above=0), help="Largest upload (413 above).")] = 25.0,
    max_audio_seconds: Annotated[float, typer.Option(callback=bounded(above=0), help="Longest audio (413 above).")] = 30.0,
    request_timeout_s: Annotated[float, typer.Option(callback=bounded(above=0), help="Per-request timeout (504).")] = 120.0,
    api_key_env: Annotated[str | None, typer.Option(help="Name of an environment variable holding the API key; "
                                                         "requests then need Authorization: Bearer <key>.")] = None,
    ray: Annotated[bool, typer.Option("--ray", help="Deploy on Ray Serve (one engine per replica).")] = False,
    replicas: Annotated[int, typer.Option(callback=bounded(1, WORKERS_MAX), help="Ray Serve replicas (with --ray).")] = 1,
    autoscale: Annotated[str | None, typer.Option(help="MIN:MAX replicas, autoscaled by ongoing requests (with --ray).")] = None,
    ray_address: Annotated[str | None, typer.Option(help="Join this Ray cluster (default: start a local one).")] = None,
    device: DeviceOpt = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="Announce the address as one JSON line on stdout "
                                                          "(engine, url, endpoints) once ready.")] = False,
):
    """Serve an engine behind an OpenAI-compatible audio API with dynamic batching and Prometheus metrics.

    The bundle is loaded and checked (manifest, hashes, execution provider) and the address is
    checked free before "serving ... on http://..." is announced; a bad bundle or a busy port is
    one error line, exit 2. SIGTERM or Ctrl-C stop it cleanly (its private temp folder removed).

    Example: salmonn-export serve --engine engines/demo-w4a16 --port 8000
    """
    from salmonn_export.serve.app import ServeSettings

    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise SalmonnError(f"--api-key-env {api_key_env}: that environment variable is empty or unset")
    settings = ServeSettings(engine=engine_path(engine), device=device, max_batch=max_batch, max_wait_ms=max_wait_ms,
                             max_queue=max_queue, max_upload_mb=max_upload_mb, max_audio_seconds=max_audio_seconds,
                             request_timeout_s=request_timeout_s, api_key=api_key)
    _check_address_free(host, port)
    if ray:
        from salmonn_export.bundle import read_manifest
        from salmonn_export.serve.ray_backend import parse_autoscale, run_ray_serve

        scaling = parse_autoscale(autoscale)
        read_manifest(settings.engine)  # each replica loads its own engine; check the bundle once here
        _announce(settings.engine, host, port, as_json)
        run_ray_serve(settings, host, port, replicas, scaling, ray_address)
        return
    import uvicorn

    from salmonn_export.runtime.engine import Engine
    from salmonn_export.serve.app import create_app

    with err.status("loading the engine..."):
        loaded = Engine(settings.engine, device=device)
    _announce(settings.engine, host, port, as_json)
    uvicorn.run(create_app(settings, engine=loaded), host=host, port=port, log_level="warning")


def _check_address_free(host: str, port: int) -> None:
    """Bind and release host:port, so a busy port or an unknown host is an error before announcing."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        raise SalmonnError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None


def _announce(engine: Path, host: str, port: int, as_json: bool) -> None:
    endpoints = ["/v1/audio/transcriptions", "/v1/audio/captions", "/health", "/metrics"]
    if as_json:
        print(json.dumps({"engine": str(engine), "url": f"http://{host}:{port}", "endpoints": endpoints}), flush=True)
    else:
        err.print(f"serving {engine} on http://{host}:{port} (POST {endpoints[0]}, {endpoints[1]})", highlight=False)
