"""`salmonn-export eval`: a test set through an engine (or the reference) into a submission CSV.

Resumable: each finished batch is appended to `<csv>.partial.jsonl` and fsynced; a rerun after
Ctrl-C or a crash skips what is there (a torn last line is ignored) and ends with the same CSV.
The partial file starts with the run's identity (backend, annotation hash, task, batch size,
shard); resuming with a different one is refused. Shards are contiguous slices, so their CSVs
concatenated in shard order are the unsharded CSV.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from salmonn_export.audio import load_clip
from salmonn_export.dataset import Example
from salmonn_export.errors import SalmonnError
from salmonn_export.harness.metrics import compute_spider, compute_wer
from salmonn_export.harness.scoring import score_submission
from salmonn_export.harness.submission import write_submission

# backend(waves, annotation task keys) -> texts
Backend = Callable[[list[np.ndarray], list[str]], list[str]]


@dataclass
class EvalOptions:
    out: Path
    task: str  # asr | aac
    batch_size: int = 1
    shard: tuple[int, int] = (0, 1)
    skip_bad_audio: bool = False
    limit: int | None = None


def shard_slice(examples: list[Example], shard: tuple[int, int]) -> list[Example]:
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise SalmonnError(f"bad shard {index}/{count}: need 0 <= I < N")
    n = len(examples)
    return examples[index * n // count:(index + 1) * n // count]


SHARDS_MAX = 100_000
"""Most shards `--shard I/N` may name: far above any cluster, low enough that a typo (1e23) is refused."""


def parse_shard(text: str | None) -> tuple[int, int]:
    """`I/N` → (I, N) with 0 <= I < N <= SHARDS_MAX; None/empty → (0, 1). Raises SalmonnError naming --shard."""
    if not text:
        return (0, 1)
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise SalmonnError(f"--shard must look like I/N (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise SalmonnError(f"--shard {text}: need 0 <= I < N")
    if n > SHARDS_MAX:
        raise SalmonnError(f"--shard {text}: N must be <= {SHARDS_MAX} (allowed: 0 <= I < N <= {SHARDS_MAX})")
    return (i, n)


def select_examples(examples: list[Example], options: EvalOptions) -> list[Example]:
    """The items this run does: its shard (`shard_slice`), then the first `limit` of it."""
    examples = shard_slice(examples, options.shard)
    return examples if options.limit is None else examples[: options.limit]


def _identity(backend_id: str, examples: list[Example], options: EvalOptions) -> dict:
    h = hashlib.sha256()
    for e in examples:
        h.update(f"{e.testset_id}\t{e.audio}\t{e.task}\n".encode())
    return {"backend": backend_id, "examples_sha256": h.hexdigest(), "task": options.task,
            "batch_size": options.batch_size, "shard": list(options.shard)}


def _read_partial(path: Path, identity: dict) -> dict[str, dict]:
    done: dict[str, dict] = {}
    if not path.is_file():
        return done
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:
            if n == len(lines) - 1:
                break  # torn last write
            raise SalmonnError(f"corrupt line {n + 1} in the partial results", path) from None
        if "meta" in record:
            if record["meta"] != identity:
                raise SalmonnError("partial results come from another run (engine, data, task, batch size or shard "
                                   "differ); delete the file or use --restart", path)
            continue
        done[record["testset_id"]] = record
    return done


def _append(path: Path, records: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def batch_records(backend: Backend, batch: list[Example], skip_bad_audio: bool) -> list[dict]:
    """One batch → partial-file records (texts, or listed skips of unreadable audio); a clip longer than
    the model's 30 s window records the seconds dropped past it (`dropped_seconds`)."""
    clips, ok, records = [], [], []
    for e in batch:
        try:
            clips.append(load_clip(e.audio))
            ok.append(e)
        except SalmonnError as exc:
            if not skip_bad_audio:
                raise
            records.append({"testset_id": e.testset_id, "skipped": exc.problem, "audio": str(e.audio)})
    if ok:
        texts = backend([c.wave for c in clips], [e.task for e in ok])
        records += [{"testset_id": e.testset_id, "text": t,
                     **({"dropped_seconds": round(c.dropped_seconds, 3)} if c.dropped_seconds else {})}
                    for e, t, c in zip(ok, texts, clips)]
    return records


# runner(batches) -> records of each batch, in order (e.g. spread over a Ray cluster)
BatchRunner = Callable[[list[list[Example]]], Iterator[list[dict]]]


def run_eval(backend: Backend | None, backend_id: str, examples: list[Example], options: EvalOptions, restart: bool = False,
             progress: Callable[[int, int, dict | None], None] | None = None, runner: BatchRunner | None = None) -> dict:
    """Run, resume, write the CSV (+ score JSON when references exist). Returns the summary.

    Batches are the same whether they run here (`backend`) or elsewhere (`runner`), so is the CSV."""
    from salmonn_export.files import check_output_file

    check_output_file(options.out, "submission CSV")  # before any work: no partial results beside a bad --out
    examples = select_examples(examples, options)
    partial = options.out.with_name(options.out.name + ".partial.jsonl")
    identity = _identity(backend_id, examples, options)
    if restart and partial.exists():
        partial.unlink()
    done = _read_partial(partial, identity)
    created = not partial.exists()
    if created:
        options.out.parent.mkdir(parents=True, exist_ok=True)
        _append(partial, [{"meta": identity}])
    try:
        return _run(backend, backend_id, examples, options, partial, done, progress, runner)
    except SalmonnError:
        if created and len(partial.read_text(encoding="utf-8").splitlines()) == 1:
            partial.unlink()  # nothing finished: no partial file that would refuse the corrected annotation
        raise


def _run(backend: Backend | None, backend_id: str, examples: list[Example], options: EvalOptions, partial: Path,
         done: dict[str, dict], progress, runner: BatchRunner | None) -> dict:
    """run_eval's work once its partial file is in place: the batches not done, the CSV, the score."""
    todo = [e for e in examples if e.testset_id not in done]
    resumed = len(examples) - len(todo)
    if progress:
        progress(resumed, len(examples), None)
    batches = [todo[i:i + options.batch_size] for i in range(0, len(todo), options.batch_size)]
    if runner is not None:
        results = runner(batches)
    else:
        results = (batch_records(backend, b, options.skip_bad_audio) for b in batches)
    finished = resumed
    for batch, records in zip(batches, results):
        _append(partial, records)
        for r in records:
            done[r["testset_id"]] = r
        finished += len(batch)
        if progress:
            progress(finished, len(examples), _running_score(options.task, examples, done))
    rows, skipped, truncated = [], [], []
    for e in examples:
        r = done[e.testset_id]
        if "skipped" in r:
            skipped.append({"testset_id": e.testset_id, "audio": r["audio"], "reason": r["skipped"]})
        else:
            rows.append((e.testset_id, r["text"]))
            if r.get("dropped_seconds"):
                truncated.append({"testset_id": e.testset_id, "audio": str(e.audio), "dropped_seconds": r["dropped_seconds"]})
    write_submission(options.out, rows)
    summary = {"csv": str(options.out), "rows": len(rows), "skipped": skipped, "truncated": truncated,
               "resumed_items": resumed,
               "task": options.task, "backend": backend_id, "shard": list(options.shard)}
    # scored from the CSV just written, through the same checks and metric as `score`
    written = [e for e in examples if "text" in done[e.testset_id]]
    with_refs = [e for e in written if e.text is not None]
    summary["unreferenced_items"] = len(written) - len(with_refs)  # rows with no reference text: not scored
    if with_refs and (options.task == "asr" or len(with_refs) >= 2):
        try:
            result = score_submission(options.out, written, options.task, require_references=False)
        except SalmonnError as exc:
            summary["score_error"] = exc.problem
        else:
            summary["items"] = result.pop("items")
            summary["score"] = result
            from salmonn_export.bundle import write_json

            write_json(options.out.with_name(options.out.stem + ".score.json"), summary)
    partial.unlink()
    return summary


def _running_score(task: str, examples: list[Example], done: dict[str, dict]) -> dict | None:
    """The metric over the items finished so far (progress display only; None while undefined)."""
    pairs = [(done[e.testset_id]["text"], e.text) for e in examples
             if e.text is not None and e.testset_id in done and "text" in done[e.testset_id]]
    try:
        if task == "asr" and pairs:
            return {"wer": compute_wer([h for h, _ in pairs], [r for _, r in pairs])["wer"]}
        if task == "aac" and len(pairs) >= 2:
            return {"spider": compute_spider([h for h, _ in pairs], [r for _, r in pairs])["spider"]}
    except SalmonnError:  # e.g. no reference word yet
        return None
    return None
