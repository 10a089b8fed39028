"""`salmonn-export serve`: an engine bundle behind an OpenAI-compatible audio API (FastAPI).

- `POST /v1/audio/transcriptions` (OpenAI's shape: multipart `file`, `model`, `response_format`
  json | text | verbose_json) runs the ASR task; `POST /v1/audio/captions`, same shape, the AAC task.
- Dynamic batching: requests wait in a bounded queue and are run together up to `max_batch` or
  `max_wait_ms`. A batch gives each request the same text `salmonn-export run` gives it alone:
  BEATs runs per clip (its padding is batch-dependent), Whisper and the Q-Former run batched, and
  generation is batched per task (mixed tasks would put [PAD] inside prompts).
- Backpressure: a full queue answers 503 with Retry-After; uploads over `max_upload_mb` or audio
  over `max_audio_seconds` get 413; unreadable audio or NaN/±inf samples 400; a request not finished in
  `request_timeout_s` 504. With an API key, requests need `Authorization: Bearer <key>` (401).
  Uploads are decoded in memory; anything the framework spools goes to a private 0700 temp folder
  removed at shutdown. No request field is ever used as a path.
- `GET /health`, `GET /metrics` (Prometheus: requests, errors, queue depth, batch sizes, TTFT,
  TPOT and end-to-end latency histograms).
"""

from __future__ import annotations

import asyncio
import hmac
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import FastAPI, File, Form, Request, UploadFile  # module level: FastAPI resolves these annotations
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from salmonn_export.audio import load_clip_bytes
from salmonn_export.errors import SalmonnError


@dataclass
class ServeSettings:
    engine: Path
    device: str = "cpu"
    max_batch: int = 4
    max_wait_ms: float = 10.0
    max_queue: int = 64
    max_upload_mb: float = 25.0
    max_audio_seconds: float = 30.0
    request_timeout_s: float = 120.0
    api_key: str | None = None


@dataclass
class Job:
    wave: np.ndarray
    task: str
    future: asyncio.Future
    enqueued: float


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.requests = Counter("salmonn_requests", "Requests by endpoint and status", ["endpoint", "status"],
                                registry=self.registry)
        self.errors = Counter("salmonn_errors", "Failed requests by reason", ["reason"], registry=self.registry)
        self.queue_depth = Gauge("salmonn_queue_depth", "Requests waiting for a batch", registry=self.registry)
        self.batch_size = Histogram("salmonn_batch_size", "Requests per executed batch",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=self.registry)
        self.ttft = Histogram("salmonn_ttft_seconds", "Batch start to first token (encoders + prefill)", buckets=buckets,
                              registry=self.registry)
        self.tpot = Histogram("salmonn_tpot_seconds", "Mean decode-step time per batch", buckets=buckets,
                              registry=self.registry)
        self.latency = Histogram("salmonn_request_seconds", "Request arrival to answer", buckets=buckets,
                                 registry=self.registry)


class Batcher:
    """Bounded queue + one worker that forms batches and runs them on one inference thread."""

    def __init__(self, engine, settings: ServeSettings, metrics: Metrics):
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=settings.max_queue)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="salmonn-infer")
        self.worker: asyncio.Task | None = None

    def start(self):
        self.worker = asyncio.create_task(self._run())

    async def stop(self):
        if self.worker:
            self.worker.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def submit(self, wave: np.ndarray, task: str) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait(Job(wave, task, future, time.perf_counter()))  # raises QueueFull
        self.metrics.queue_depth.set(self.queue.qsize())
        return future

    async def _run(self):
        while True:
            jobs = [await self.queue.get()]
            deadline = time.perf_counter() + self.settings.max_wait_ms / 1000
            while len(jobs) < self.settings.max_batch:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    jobs.append(await asyncio.wait_for(self.queue.get(), remaining))
                except TimeoutError:
                    break
            self.metrics.queue_depth.set(self.queue.qsize())
            jobs = [j for j in jobs if not j.future.cancelled()]
            if not jobs:
                continue
            self.metrics.batch_size.observe(len(jobs))
            loop = asyncio.get_running_loop()
            try:
                texts, ttft, tpot = await loop.run_in_executor(self.pool, self._infer, [j.wave for j in jobs],
                                                               [j.task for j in jobs])
                self.metrics.ttft.observe(ttft)
                if tpot is not None:
                    self.metrics.tpot.observe(tpot)
                for job, text in zip(jobs, texts):
                    if not job.future.done():
                        job.future.set_result(text)
            except Exception as exc:  # one failing batch must not kill the worker
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)

    def _infer(self, waves: list[np.ndarray], tasks: list[str]) -> tuple[list[str], float, float | None]:
        """Batch-independent results: Whisper batched (fixed 30 s input), BEATs and the Q-Former per
        clip (BEATs padding depends on the batch), generation batched per task. Returns texts,
        time to first token and the mean decode-step time."""
        eng = self.engine
        t0 = time.perf_counter()
        hidden = eng.encode_whisper(eng.whisper_features(waves))
        speech = np.concatenate([
            eng.qformer(hidden[i:i + 1], eng.encode_beats([w]) if eng.beats_cfg else None) for i, w in enumerate(waves)
        ])
        calls: list[tuple[bool, float, float]] = []  # (first call of a group, start, end)
        original_step = eng.decoder_step
        group_start = {"flag": True}

        def timed_step(*args, **kwargs):
            t = time.perf_counter()
            result = original_step(*args, **kwargs)
            calls.append((group_start["flag"], t, time.perf_counter()))
            group_start["flag"] = False
            return result

        texts = [""] * len(waves)
        eng.decoder_step = timed_step
        try:
            for task in dict.fromkeys(tasks):
                idx = [i for i, t in enumerate(tasks) if t == task]
                group_start["flag"] = True
                embeds, mask = eng.prompt_wrap(speech[idx], [task] * len(idx))
                for i, text in zip(idx, eng.decode(eng.generate_ids(embeds, mask))):
                    texts[i] = text
        finally:
            del eng.decoder_step
        ttft = calls[0][2] - t0 if calls else time.perf_counter() - t0
        steps = [end - start for first, start, end in calls if not first]
        return texts, ttft, float(np.mean(steps)) if steps else None


def create_app(settings: ServeSettings, engine=None):
    """The FastAPI app (an already-loaded `Engine` may be passed, e.g. by Ray Serve replicas)."""
    from salmonn_export.runtime.engine import Engine

    state: dict = {}  # filled at startup: the app object itself stays picklable (Ray Serve ships it to replicas)

    @asynccontextmanager
    async def lifespan(_app):
        eng = engine or Engine(settings.engine, device=settings.device)  # a bad bundle fails before anything is made
        private = Path(tempfile.mkdtemp(prefix="salmonn-serve-"))
        state["tmp"], state["old_tempdir"] = private, tempfile.tempdir
        try:
            os.chmod(private, 0o700)
            tempfile.tempdir = str(private)  # where Starlette spools large uploads
            state["engine"] = eng
            state["metrics"] = Metrics()
            state["batcher"] = Batcher(eng, settings, state["metrics"])
            state["batcher"].start()
            try:
                yield
            finally:
                await state["batcher"].stop()
        finally:
            tempfile.tempdir = state["old_tempdir"]
            shutil.rmtree(private, ignore_errors=True)

    app = FastAPI(title="salmonn-export serve", version="1", lifespan=lifespan)

    def error(endpoint: str, status: int, message: str, reason: str, headers: dict | None = None):
        metrics = state["metrics"]
        metrics.requests.labels(endpoint, str(status)).inc()
        metrics.errors.labels(reason).inc()
        body = {"error": {"message": message, "type": reason, "code": status}}
        return JSONResponse(body, status_code=status, headers=headers)

    def authorized(request: Request) -> bool:
        if not settings.api_key:
            return True
        header = request.headers.get("authorization", "")
        return header.startswith("Bearer ") and hmac.compare_digest(header[7:], settings.api_key)

    async def handle(endpoint: str, task: str, request: Request, file: UploadFile, response_format: str):
        start = time.perf_counter()
        if not authorized(request):
            return error(endpoint, 401, "missing or wrong API key (Authorization: Bearer <key>)", "unauthorized")
        if response_format not in ("json", "text", "verbose_json"):
            return error(endpoint, 400, "response_format must be json, text or verbose_json", "bad_request")
        limit = int(settings.max_upload_mb * 1024 * 1024)
        data = await file.read(limit + 1)
        if len(data) > limit:
            return error(endpoint, 413, f"upload larger than {settings.max_upload_mb:g} MB", "too_large")
        seconds = _duration(data)
        if seconds > settings.max_audio_seconds:
            return error(endpoint, 413, f"audio longer than {settings.max_audio_seconds:g} s", "too_long")
        name = file.filename if file.filename and file.filename.isprintable() else repr(file.filename or "upload")
        try:
            clip = load_clip_bytes(data, name)
        except SalmonnError as exc:
            return error(endpoint, 400, str(exc), "bad_audio")
        try:
            future = state["batcher"].submit(clip.wave, task)
        except asyncio.QueueFull:
            return error(endpoint, 503, "server busy: queue full", "queue_full", {"Retry-After": "1"})
        try:
            text = await asyncio.wait_for(asyncio.shield(future), settings.request_timeout_s)
        except TimeoutError:
            future.cancel()
            return error(endpoint, 504, f"not finished within {settings.request_timeout_s:g} s", "timeout")
        except Exception as exc:
            return error(endpoint, 500, f"inference failed: {type(exc).__name__}: {exc}", "inference_error")
        state["metrics"].latency.observe(time.perf_counter() - start)
        state["metrics"].requests.labels(endpoint, "200").inc()
        # audio past the model's 30 s window is dropped (as the challenge does): say so
        dropped = {"X-Audio-Dropped-Seconds": f"{clip.dropped_seconds:.3f}"} if clip.dropped_seconds else None
        if response_format == "text":
            return PlainTextResponse(text, headers=dropped)
        if response_format == "verbose_json":
            body = {"task": "transcribe" if task == "asr" else "caption", "language": "english",
                    "duration": clip.native_seconds, "text": text, "segments": [],
                    "dropped_seconds": round(clip.dropped_seconds, 3)}
            return JSONResponse(body, headers=dropped)
        return JSONResponse({"text": text}, headers=dropped)

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request, file: UploadFile = File(...), model: str = Form("salmonn"),
                             response_format: str = Form("json")):
        return await handle("transcriptions", "asr", request, file, response_format)

    @app.post("/v1/audio/captions")
    async def captions(request: Request, file: UploadFile = File(...), model: str = Form("salmonn"),
                       response_format: str = Form("json")):
        return await handle("captions", "aac", request, file, response_format)

    @app.get("/health")
    async def health():
        eng = state.get("engine")
        return {"status": "ok" if eng else "loading", "recipe": eng.manifest["recipe"]["name"] if eng else None,
                "queue_depth": state["batcher"].queue.qsize() if "batcher" in state else 0}

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(state["metrics"].registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _duration(data: bytes) -> float:
    """Native duration of an upload (before the 30 s truncation the model applies)."""
    import io

    import soundfile as sf

    try:
        info = sf.info(io.BytesIO(data))
        return info.frames / info.samplerate
    except Exception:
        return 0.0
