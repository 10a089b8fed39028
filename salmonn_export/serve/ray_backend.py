"""Scale-out on Ray (extra `salmonn-export[ray]`): the same server on Ray Serve, and eval on Ray Data.

- `serve --ray`: the FastAPI app of `app.py` as a Ray Serve deployment (`serve.ingress`), one engine
  per replica (one GPU per replica where the device is cuda/tensorrt), fixed `--replicas N` or
  `--autoscale MIN:MAX` (target ongoing requests per replica = `--max-batch`).
- `eval --ray`: the test set's batches as a Ray Dataset mapped by an actor pool, one engine per
  actor; each actor runs exactly the batches the single-process eval would run, results come back
  in order and go through the same resumable writer, so the CSV is identical.
Without `--ray-address` a local Ray instance is started; with it, an existing cluster is joined
(audio paths must then be readable on the workers, e.g. a shared file system).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

from salmonn_export.errors import SalmonnError


def _ray():
    try:
        import ray
    except ImportError:
        raise SalmonnError("Ray is not installed: pip install 'salmonn-export[ray]'") from None
    return ray


def init_ray(address: str | None, num_cpus: int | None = None):
    ray = _ray()
    if not ray.is_initialized():
        import logging

        if address:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    return ray


def parse_autoscale(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        lo, hi = (int(x) for x in text.split(":"))
    except ValueError:
        raise SalmonnError(f"--autoscale must look like MIN:MAX, got {text!r}") from None
    if not 0 <= lo <= hi or hi < 1:
        raise SalmonnError(f"--autoscale {text}: need 0 <= MIN <= MAX and MAX >= 1")
    return lo, hi


def run_ray_serve(settings, host: str, port: int, replicas: int, autoscale: tuple[int, int] | None,
                  address: str | None) -> None:
    """Deploy and block until interrupted; shuts Serve and the local Ray instance down on exit."""
    ray = init_ray(address)
    from ray import serve

    from salmonn_export.serve.app import create_app

    gpus = 1 if settings.device in ("cuda", "tensorrt") else 0
    options: dict = {"ray_actor_options": {"num_cpus": 1, "num_gpus": gpus}, "name": "salmonn"}
    if autoscale:
        options["autoscaling_config"] = {"min_replicas": autoscale[0], "max_replicas": autoscale[1],
                                         "target_ongoing_requests": settings.max_batch}
    else:
        options["num_replicas"] = replicas
    settings.engine = Path(settings.engine).resolve()
    app = create_app(settings)
    replica = serve.deployment(**options)(serve.ingress(app)(type("SalmonnReplica", (), {})))
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(replica.bind(), route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()


class _EvalActor:
    """One engine per actor; runs whole eval batches exactly as the single-process eval does."""

    def __init__(self, bundle: str, device: str, skip_bad_audio: bool):
        from salmonn_export.runtime.engine import Engine

        self.engine = Engine(bundle, device=device)
        self.skip_bad_audio = skip_bad_audio

    def __call__(self, rows: dict) -> dict:
        import json

        from salmonn_export.dataset import Example
        from salmonn_export.harness.evaluate import batch_records

        out = []
        for payload in rows["batch"]:
            batch = [Example(e["testset_id"], Path(e["audio"]), e["task"]) for e in json.loads(payload)]
            records = batch_records(lambda w, t: self.engine.run_waves(w, t).texts, batch, self.skip_bad_audio)
            out.append(json.dumps(records, ensure_ascii=False))
        return {"records": out}


def ray_batch_runner(bundle: Path, device: str, skip_bad_audio: bool, actors: int, address: str | None):
    """A `run_eval` batch runner: batches → Ray Dataset → actor pool → records, in order."""
    import json

    def runner(batches: list) -> Iterator[list[dict]]:
        ray = init_ray(address)
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        payloads = [json.dumps([{"testset_id": e.testset_id, "audio": str(e.audio), "task": e.task} for e in b])
                    for b in batches]
        ds = ray.data.from_items([{"batch": p} for p in payloads])
        ds = ds.map_batches(_EvalActor, fn_constructor_args=(str(Path(bundle).resolve()), device, skip_bad_audio),
                            batch_size=1, concurrency=actors, num_cpus=1)
        for row in ds.iter_rows():
            yield json.loads(row["records"])

    return runner
