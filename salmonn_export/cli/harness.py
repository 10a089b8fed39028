"""Challenge-harness commands: eval, score, validate-submission, merge, demo-data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from salmonn_export.cli.common import (
    BATCH_MAX,
    COUNT_MAX,
    SEED_MAX,
    WORKERS_MAX,
    DeviceOpt,
    JsonOpt,
    TaskOpt,
    app,
    bounded,
    check_audio_files,
    engine_path,
    err,
    handle_errors,
    out,
)
from salmonn_export.errors import SalmonnError


@app.command("eval")
@handle_errors
def eval_cmd(
    task: TaskOpt = "asr",
    annotation: Annotated[Path | None, typer.Option(help="Challenge annotation JSON (default: the config's "
                                                                   "datasets.test_ann_path; the demo's test set for "
                                                                   "the demo).")] = None,
    engine: Annotated[Path | None, typer.Option("--engine", "-e", help="Engine bundle to evaluate.")] = None,
    model: Annotated[Path | None, typer.Option("--model", "-m", help="Evaluate the PyTorch reference of this config "
                                                                      "instead of an engine.")] = None,
    audio_root: Annotated[Path | None, typer.Option(help="Audio prefix: paths become ROOT + '/' + path "
                                                        "(default: relative to the annotation).")] = None,
    out_csv: Annotated[Path, typer.Option("--out", "-o", help="Submission CSV to write.")] = Path("submission.csv"),
    batch_size: Annotated[int, typer.Option(callback=bounded(1, BATCH_MAX),
                                            help="Clips per batch (the challenge used run.batch_size_eval, 8; "
                                                 "BEATs padding makes results batch-dependent).")] = 1,
    limit: Annotated[int | None, typer.Option(callback=bounded(1, COUNT_MAX),
                                              help="Only the first N items (after sharding).")] = None,
    shard: Annotated[str | None, typer.Option(help="Run shard I/N (contiguous slice) of the items.")] = None,
    skip_bad_audio: Annotated[bool, typer.Option("--skip-bad-audio", help="List unreadable files as skipped "
                                                                         "instead of stopping.")] = False,
    restart: Annotated[bool, typer.Option("--restart", help="Discard partial results of an earlier run.")] = False,
    ray: Annotated[bool, typer.Option("--ray", help="Spread the batches over Ray actors (Ray Data), one engine each.")] = False,
    ray_address: Annotated[str | None, typer.Option(help="Join this Ray cluster (default: start a local one).")] = None,
    ray_actors: Annotated[int, typer.Option(callback=bounded(1, WORKERS_MAX), help="Engine actors with --ray.")] = 2,
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
):
    """Run an engine (or the reference) over a test set into a submission CSV, scored when references exist.

    What runs: --engine BUNDLE, or --model CONFIG (the PyTorch reference), else the demo's w4a16
    bundle. On what: --annotation, else the test set of the model's config (`datasets.test_ann_path`;
    with --engine, the config the bundle was built from), else, for the demo, its test set. Every
    audio file is checked before the model loads. The CSV holds the --task items only; beside it
    go OUT.score.json (the score and every item's errors) and, while running, OUT.partial.jsonl.

    Resumable: rerun the same command after an interruption. With --ray the same batches run on a
    Ray cluster and the CSV is identical.

    Example: salmonn-export eval --task asr --engine engines/demo-w4a16 --annotation data/ann.json --out sub.csv
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from salmonn_export.dataset import read_annotation
    from salmonn_export.harness.evaluate import EvalOptions, parse_shard, run_eval, select_examples

    if engine is not None and model is not None:
        raise SalmonnError("give --engine or --model, not both")
    shard_range = parse_shard(shard)  # options are checked before anything is loaded
    from salmonn_export.files import check_output_file

    check_output_file(out_csv, "submission CSV")
    if model is not None:
        from salmonn_export.model.config import check_model_files, load_config

        # a missing or malformed config, or a file it names, is one line before torch is imported (~6 s)
        model_cfg = check_model_files(load_config(model))
    if annotation is None and audio_root is not None:
        raise SalmonnError("--audio-root goes with --annotation (a config's own test set uses `datasets.prefix`)")
    if annotation is None and (model is not None or engine is not None):
        annotation, audio_root = _config_test_set(model_cfg if model is not None else None, engine)
    if annotation is None:
        from salmonn_export.files import cache_root
        from salmonn_export.harness.demo_data import write_demo_data

        folder = cache_root() / "demo-data"
        if not (folder / "annotation.json").is_file():
            with err.status("synthesizing the demo test set (first use only)..."):
                write_demo_data(folder, force=True)
        annotation = folder / "annotation.json"
    examples = read_annotation(annotation, task, audio_root)
    options = EvalOptions(out=out_csv, task=task, batch_size=batch_size, shard=shard_range,
                          skip_bad_audio=skip_bad_audio, limit=limit)
    selected = select_examples(examples, options)  # run_eval selects the same items
    if not skip_bad_audio:
        try:
            check_audio_files([e.audio for e in selected])
        except SalmonnError as exc:
            raise SalmonnError(f"{exc.problem} (named by {annotation}; --skip-bad-audio lists such files as skipped)",
                               exc.path) from None
    err.print(f"eval {task}: {annotation} on {model or engine or 'the demo w4a16 bundle'}", highlight=False)
    from salmonn_export.harness.submission import ID_PATTERN

    odd_ids = [e.testset_id for e in selected if not ID_PATTERN.match(e.testset_id)]
    if odd_ids:  # said before the run, not after it (the score's check is the challenge validator's)
        err.print(f"warning: {len(odd_ids)} testset_ids (e.g. {odd_ids[0]!r}) do not match the challenge's "
                  "^test\\d{4}$: the CSV is written, but it is not a valid submission and is not scored",
                  highlight=False, soft_wrap=True)
    if model is not None:
        from salmonn_export.model.salmonn import load_salmonn

        reference = load_salmonn(model)

        def backend(waves, tasks):
            return reference.generate_batch(reference.make_batch(waves, tasks))[0]

        backend_id = f"reference:{model.resolve()}"
    else:
        from salmonn_export.runtime.engine import Engine

        bundle = engine_path(engine)
        eng = Engine(bundle, device=device)

        def backend(waves, tasks):
            return eng.run_waves(waves, tasks).texts

        backend_id = f"engine:{Path(bundle).resolve()}:{eng.manifest['files'].get('decoder.onnx.data', '')[:16]}"
    runner = None
    if ray:
        if model is not None:
            raise SalmonnError("--ray runs engine bundles; use --engine")
        from salmonn_export.serve.ray_backend import ray_batch_runner

        runner = ray_batch_runner(Path(bundle), device, skip_bad_audio, ray_actors, ray_address)
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      TextColumn("{task.fields[score]}"), console=err, transient=as_json) as progress:
            tid = progress.add_task(f"eval {task}", total=None, score="")

            def on_progress(done, total, running):
                label = ", ".join(f"{k} {v:.4g}" for k, v in (running or {}).items())
                progress.update(tid, completed=done, total=total, score=label)

            summary = run_eval(backend, backend_id, examples, options, restart=restart, progress=on_progress,
                               runner=runner)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM; said once the progress display has stopped
        err.print(f"finished items are kept in {out_csv}.partial.jsonl: rerun the same command to resume",
                  highlight=False, soft_wrap=True)
        raise
    if as_json:
        print(json.dumps(summary, indent=1, ensure_ascii=False))
        return
    out.print(f"wrote {summary['csv']} ({summary['rows']} rows, {len(summary['skipped'])} skipped, "
              f"{summary['resumed_items']} resumed)")
    for s_ in summary["skipped"]:
        err.print(f"skipped {s_['testset_id']}: {s_['audio']}: {s_['reason']}")
    if summary.get("truncated"):
        cut = summary["truncated"]
        err.print(f"warning: {len(cut)} clips are longer than 30 s; the model used only their first 30 s (as the "
                  f"challenge does), e.g. {cut[0]['audio']}: {cut[0]['dropped_seconds']} s dropped", highlight=False,
                  soft_wrap=True)
    if "score" in summary:
        print_score(task, summary["score"])
        if summary["skipped"]:
            err.print(f"warning: the score covers the {summary['rows']} items written; the CSV lacks the "
                      f"{len(summary['skipped'])} skipped ones, so it is not a complete submission", highlight=False)
        if summary["unreferenced_items"]:
            err.print(f"warning: {summary['unreferenced_items']} items have no reference text and are not scored",
                      highlight=False)
    if "score_error" in summary:
        err.print(f"warning: not scored: {summary['score_error']}", highlight=False)


def _config_test_set(cfg, engine: Path | None) -> tuple[Path | None, Path | None]:
    """The test annotation (and audio root, `datasets.prefix`) of --model's config, or of the config the
    --engine bundle was built from; (None, None) for the demo model, whose test set `demo-data` writes.
    Raises SalmonnError naming the config when it names no test set."""
    from salmonn_export.dataset import config_annotation
    from salmonn_export.files import cache_root
    from salmonn_export.model.config import load_config

    if cfg is None:
        from salmonn_export.bundle import read_manifest

        source = Path(read_manifest(engine_path(engine))["source"]["config"])
        if not source.is_file():
            raise SalmonnError("the bundle's source config is gone, so its test set is unknown; pass --annotation",
                               source)
        cfg = load_config(source)
    if cfg.path is not None and cfg.path.resolve() == (cache_root() / "demo-model" / "config.yaml").resolve():
        return None, None  # model.demo.demo_dir(), without importing torch
    source = config_annotation(cfg, "test_ann_path")
    if source is None:
        raise SalmonnError("no test set: the config's `datasets:` names no test_ann_path; pass --annotation", cfg.path)
    return source.path, source.audio_root


def print_score(task: str, result: dict) -> None:
    """The challenge's printed line (`WER: x.xxxx%` / the SPIDEr value) plus a warning for empty references."""
    out.print(f"WER: {result['wer_percent']:0.4f}%" if task == "asr" else f"SPIDEr (CIDEr-D x100): {result['spider']}")
    if result.get("empty_references"):
        what = "normalise to no words (their hypothesis words count as insertions)" if task == "asr" else \
            "are empty (each scores 0 whatever the hypothesis)"
        err.print(f"warning: {result['empty_references']} references {what}", highlight=False)


@app.command()
@handle_errors
def score(
    task: TaskOpt = "asr",
    submission: Annotated[Path, typer.Option(help="Submission CSV (testset_id,text).")] = Path("submission.csv"),
    annotation: Annotated[Path, typer.Option(help="Annotation JSON with reference texts.")] = Path("annotation.json"),
    as_json: JsonOpt = False,
):
    """Score any submission CSV exactly as the challenge does (WER or its CIDEr-D "SPIDEr").

    The CSV is read as the challenge's pandas reader reads it and must first pass every
    validate-submission check against the task's annotation items (columns, ids, texts pandas reads
    as strings, no duplicate, missing or unknown ids): otherwise one error line, exit 2, nothing scored.

    WER is corpus-level (sum of edits / sum of reference words after Whisper's English normaliser).
    A reference that normalises to no words ("", "uh", "um, uh", punctuation only) adds its
    hypothesis words as insertions; when NO reference has a word, WER is undefined and score exits 2
    with an error (the challenge's metrics.py divides by zero there). For aac, an empty reference
    scores 0 for its item, as in the challenge; both are counted in `empty_references`.

    Example: salmonn-export score --task aac --submission sub.csv --annotation ann.json
    """
    from salmonn_export.dataset import read_annotation
    from salmonn_export.harness.scoring import score_submission

    result = score_submission(submission, read_annotation(annotation, task), task, annotation)
    result.pop("items")
    if as_json:
        print(json.dumps(result, indent=1))
    else:
        print_score(task, result)


@app.command("validate-submission")
@handle_errors
def validate_submission_cmd(
    submission: Annotated[Path, typer.Argument(help="Submission CSV.")],
    annotation: Annotated[Path | None, typer.Option(help="Also check ids against this annotation.")] = None,
    task: Annotated[str | None, typer.Option(help="With --annotation: only that task's items (asr | aac).")] = None,
    as_json: JsonOpt = False,
):
    """Check a submission CSV with the challenge validator's rules and more.

    Columns, ids and string texts as the validator does, plus duplicate ids and ids missing from or
    unknown to the annotation. Exit 1 when invalid, a file that cannot be parsed included (not UTF-8,
    unbalanced quotes, empty); exit 2 (one `error:` line) when the file is missing or is a folder.

    Example: salmonn-export validate-submission sub.csv --annotation ann.json --task asr
    """
    from salmonn_export.dataset import read_annotation
    from salmonn_export.harness.submission import validate_submission

    examples = read_annotation(annotation, task) if annotation else None
    report = validate_submission(submission, examples)
    if as_json:
        print(json.dumps(report, indent=1))
    else:
        out.print(f"{submission}: {'valid' if report['valid'] else 'INVALID'} ({report['rows']} rows)")
        for p in report["problems"]:
            out.print(f"  - {p}", highlight=False, soft_wrap=True)
    if not report["valid"]:
        raise typer.Exit(1)


@app.command()
@handle_errors
def merge(
    parts: Annotated[list[Path], typer.Argument(help="Shard CSVs, in shard order.")],
    out_csv: Annotated[Path, typer.Option("--out", "-o", help="Merged CSV.")] = Path("submission.csv"),
    annotation: Annotated[Path | None, typer.Option(help="Order rows as this annotation and check completeness.")] = None,
    task: Annotated[str | None, typer.Option(help="With --annotation: the task (asr | aac).")] = None,
    as_json: JsonOpt = False,
):
    """Join shard outputs of `eval --shard I/N` into one submission CSV.

    Example: salmonn-export merge part0.csv part1.csv --out submission.csv --annotation ann.json --task asr
    """
    from salmonn_export.dataset import read_annotation
    from salmonn_export.files import check_output_file
    from salmonn_export.harness.submission import merge_submissions, write_submission

    check_output_file(out_csv, "submission CSV")
    rows = merge_submissions(parts, read_annotation(annotation, task) if annotation else None)
    write_submission(out_csv, rows)
    if as_json:
        print(json.dumps({"csv": str(out_csv), "rows": len(rows), "shards": [str(p) for p in parts]}, indent=1))
    else:
        out.print(f"wrote {out_csv} ({len(rows)} rows from {len(parts)} shards)")


@app.command("demo-data")
@handle_errors
def demo_data(
    out_dir: Annotated[Path, typer.Argument(help="Folder for the audio and annotation.json.")],
    seed: Annotated[int, typer.Option(callback=bounded(0, SEED_MAX), help="Seed for the sound scenes.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty folder.")] = False,
    as_json: JsonOpt = False,
):
    """Synthesize a small ASR + AAC test set (flite speech, generated sound scenes) with references.

    Example: salmonn-export demo-data /tmp/demo-set --seed 0
    """
    from salmonn_export.harness.demo_data import write_demo_data

    info = write_demo_data(out_dir, seed=seed, force=force)
    if as_json:
        print(json.dumps(info, indent=1, default=str))
    else:
        out.print(f"wrote {info['asr']} ASR and {info['aac']} AAC items to {info['folder']}; "
                  f"annotation: {info['annotation']}")
