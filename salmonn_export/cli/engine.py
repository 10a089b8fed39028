"""Commands that use engine bundles: run, verify, bench."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from salmonn_export.cli.common import (
    BATCH_MAX,
    ITERS_MAX,
    MAX_NEW_TOKENS_LIMIT,
    NUM_BEAMS_LIMIT,
    SEED_MAX,
    TORCH_DEVICES,
    DeviceOpt,
    EngineOpt,
    JsonOpt,
    app,
    audio_or_demo,
    bounded,
    device_check,
    engine_path,
    err,
    handle_errors,
    out,
    stream_texts,
)
from salmonn_export.errors import SalmonnError
from salmonn_export.files import atomic_write_text, check_output_file


@app.command()
@handle_errors
def run(
    audio: Annotated[list[Path] | None, typer.Argument(help="Audio files. Default: the demo clips for the task.")] = None,
    task: Annotated[str, typer.Option("--task", "-t", help="asr, aac, or another task key of the bundle's prompts.")] = "asr",
    engine: EngineOpt = None,
    batch_size: Annotated[int, typer.Option(callback=bounded(1, BATCH_MAX), help="Clips per batch.")] = 1,
    num_beams: Annotated[int | None, typer.Option(callback=bounded(1, NUM_BEAMS_LIMIT),
                                                  help="Override the bundle's num_beams (1 = greedy).")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(callback=bounded(1, MAX_NEW_TOKENS_LIMIT),
                                                       help="Override max_new_tokens.")] = None,
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
):
    """Run an engine bundle on audio files (onnxruntime + numpy, no PyTorch): one line per file.

    Each `file<TAB>text` line is printed as soon as its batch finishes; a name or text holding a tab,
    newline or other unprintable character is printed quoted, as a Python string literal, so that it
    stays one line. --json prints one JSON document (settings, timings, results in order, texts as
    they are) when all files are done.

    A `build --target torch` bundle runs on the PyTorch engine instead (its manifest says so), on
    --device cpu or cuda.

    Example: salmonn-export run --engine engines/demo-w4a16 --task asr speech.wav
    """
    from salmonn_export.torch_engine import bundle_target

    bundle = engine_path(engine)
    from salmonn_export.bundle import read_manifest
    from salmonn_export.tasks import templated_prompt

    prompts = read_manifest(bundle, verify_hashes=False).get("prompts")  # an incomplete bundle: Engine says so
    if isinstance(prompts, dict) and isinstance(prompts.get("test_prompts"), dict):
        templated_prompt(prompts["test_prompts"], task, "")  # an unknown task stops before the sessions load
    audio = audio_or_demo(audio, task, engine is not None, "engine")
    t0 = time.perf_counter()
    if bundle_target(bundle) == "torch":
        from salmonn_export.torch_engine.engine import TorchEngine

        eng = TorchEngine(bundle, device=device, compile_decode=device.startswith("cuda"))
    else:
        from salmonn_export.runtime.engine import Engine

        eng = Engine(bundle, device=device)
    load_s = time.perf_counter() - t0

    def transcribe(batch: list[Path]) -> list[str]:
        return eng.transcribe(batch, task, batch_size=batch_size, num_beams=num_beams, max_new_tokens=max_new_tokens)

    stream_texts(audio, batch_size, transcribe, as_json, {"task": task, "engine": str(bundle), "load_seconds":
                 round(load_s, 3), "providers": [str(p) for p in eng.providers]}, "run_seconds")


@app.command()
@handle_errors
def verify(
    engine: Annotated[Path | None, typer.Argument(help="Engine bundle (default: the demo w4a16 bundle).")] = None,
    model: Annotated[Path | None, typer.Option("--model", "-m", help="Challenge YAML config of the trained SALMONN "
                                                                      "(default: the one the bundle was built from, "
                                                                      "recorded in its manifest).")] = None,
    data: Annotated[Path | None, typer.Option(help="Audio folder (both tasks per file) or annotation .json "
                                                   "(default: the config's datasets valid/test/train annotation; "
                                                   "the demo clips for the demo model).")] = None,
    audio_root: Annotated[Path | None, typer.Option(help="Audio prefix for a --data annotation: paths become ROOT + '/' + "
                                                        "path, as under `datasets.prefix` (default: relative to the "
                                                        "annotation).")] = None,
    report: Annotated[Path | None, typer.Option(help="Write the JSON report here (and a .md beside it).")] = None,
    num_beams: Annotated[int | None, typer.Option(callback=bounded(1, NUM_BEAMS_LIMIT),
                                                  help="Override num_beams for the end-to-end texts.")] = None,
    as_json: JsonOpt = False,
):
    """Prove parity: reference vs engine, stage by stage and end to end, against the recipe's thresholds.

    Exit code 1 when a threshold is missed.

    Example: salmonn-export verify engines/demo-w4a16 --report verify.json
    """
    import gc
    import tempfile

    from rich.progress import Progress

    from salmonn_export.bundle import read_manifest
    from salmonn_export.dataset import choose_data
    from salmonn_export.model.config import check_model_files, load_config

    if report is not None:  # before anything is loaded or run
        check_output_file(report, "report")
        check_output_file(report.with_suffix(".md"), "markdown report")
    bundle = engine_path(engine)
    err.print(f"checking the engine bundle {bundle}", highlight=False)
    manifest = read_manifest(bundle)  # a broken bundle stops here, not after the reference pass
    if manifest.get("target") == "torch":
        raise SalmonnError("verify compares ONNX engine bundles with the reference; this is a `--target torch` "
                           "bundle: build one without --target to verify it", bundle)
    config = model or Path(manifest["source"]["config"])
    if not config.is_file():
        raise SalmonnError("the bundle's source config is gone; pass --model CONFIG", config)
    cfg = check_model_files(load_config(config))
    _check_bundle_matches_config(manifest, cfg, bundle)
    source = choose_data(cfg, data, "--data", "verification", audio_root)
    # torch and the model code load only now: bad arguments above are one line in ~1 s, not ~7 s
    from salmonn_export.harness.parity import (
        Item,
        Spill,
        compare,
        engine_pass,
        judge,
        markdown_report,
        reference_pass,
        verify_items,
    )
    from salmonn_export.model.salmonn import load_salmonn
    from salmonn_export.runtime.engine import Engine

    def demo_items():
        from salmonn_export.model.demo import demo_clips

        return [Item(p, "asr") for p in demo_clips("asr")] + [Item(p, "aac") for p in demo_clips("aac")]

    items = demo_items() if source.is_demo else verify_items(source.path, demo_items, source.audio_root)
    # one side at a time, the reference freed before the engine loads: a 3B reference (~12 GB) and an
    # fp32 3B engine (~16 GB) do not fit 24 GB together
    err.print(f"loading the PyTorch reference {config} (a minute or more at real size)", highlight=False)
    reference = load_salmonn(config, low_memory=True)  # fp16-stored LLM stays fp16
    with tempfile.TemporaryDirectory(prefix="salmonn-verify-") as tmp, Progress(console=err, transient=True) as progress:
        task_id = progress.add_task(f"reference on {len(items)} items", total=len(items))
        ref = reference_pass(reference, items, Spill(Path(tmp) / "reference"),
                             lambda done, total: progress.update(task_id, completed=done), num_beams=num_beams)
        del reference
        gc.collect()
        progress.console.print(f"loading the engine {bundle}", highlight=False)
        eng = Engine(bundle, verify_hashes=False)  # hashes checked above
        task_id = progress.add_task(f"engine on {len(items)} items", total=len(items))
        out_pass = engine_pass(eng, items, Spill(Path(tmp) / "engine"),
                               lambda done, total: progress.update(task_id, completed=done), num_beams=num_beams)
        result = compare(items, ref, out_pass)
    verdict = judge(result, manifest)
    recipe = manifest["recipe"]["name"]
    full = {"bundle": str(bundle), "recipe": recipe, "data": source.record(), **result, "verdict": verdict}
    if report is not None:
        from salmonn_export.bundle import write_json

        report.parent.mkdir(parents=True, exist_ok=True)
        write_json(report, full)
        atomic_write_text(report.with_suffix(".md"), markdown_report(result, verdict, str(bundle), recipe))
    if as_json:
        print(json.dumps(full, indent=1, ensure_ascii=False))
    else:
        out.print(markdown_report(result, verdict, str(bundle), recipe), highlight=False)
    if not verdict["passed"]:
        raise typer.Exit(1)


def _check_bundle_matches_config(manifest: dict, cfg, bundle: Path) -> None:
    """verify compares a bundle with the model it was built from: a config whose Q-Former windowing
    differs from the bundle's is the wrong model (SalmonnError). The trained checkpoint and BEATs file
    are compared with the sha256s the manifest recorded (a few seconds at real size; the Whisper and
    LLM folders, GBs, are not hashed again): a difference is a warning line naming the file, since
    every check would then compare against another model. So is a config file that differs."""
    from salmonn_export.bundle import sha256_file
    from salmonn_export.model.qformer import num_windows, window_size

    m = cfg.model
    window, stride = window_size(m.second_per_window), window_size(m.second_stride)
    got = {"window": window, "stride": stride,
           "speech_tokens": num_windows(1500, window, stride) * m.num_speech_query_token}
    built = {k: manifest.get("qformer", {}).get(k) for k in got}
    if got != built:
        raise SalmonnError(f"this config's Q-Former windowing {got} is not the bundle's {built}: the bundle was "
                           f"built from another model (its source: {manifest['source'].get('config')})", cfg.path)
    recorded = manifest["source"].get("sha256", {})
    built_from = manifest["source"].get("config")
    for label, value in (("ckpt", m.ckpt), ("beats", m.beats_path)):
        path = cfg.resolve(value) if value else None
        if recorded.get(label) and path is not None and path.is_file() and sha256_file(path) != recorded[label]:
            err.print(f"warning: {path} is not the {label} file the bundle was built from (sha256 differs; built "
                      f"from {built_from}): verify would compare the engine with another model", highlight=False)
    if recorded.get("config") and cfg.path and sha256_file(cfg.path) != recorded["config"]:
        same_path = built_from and Path(built_from).resolve() == cfg.path.resolve()
        err.print(f"warning: {cfg.path} " + ("changed since the bundle was built from it" if same_path else
                                              f"differs from the config the bundle was built from ({built_from})")
                  + " (sha256 differs)", highlight=False)


@app.command()
@handle_errors
def bench(
    engines: Annotated[list[Path] | None, typer.Argument(help="Engine bundles (default: the demo w4a16 bundle).")] = None,
    reference: Annotated[bool, typer.Option("--reference/--no-reference", help="Also measure the PyTorch reference.")] = True,
    model: Annotated[Path | None, typer.Option("--model", "-m", help="Challenge YAML config for the reference "
                                                                      "(default: the one the first bundle was built "
                                                                      "from).")] = None,
    audio_seconds: Annotated[float, typer.Option(callback=bounded(high=30, above=0),
                                                 help="Length of the N(0,1) noise clip (challenge: 10).")] = 10.0,
    warmup: Annotated[int, typer.Option(callback=bounded(0, ITERS_MAX),
                                        help="Warm-up iterations, discarded (challenge: 10).")] = 10,
    iters: Annotated[int, typer.Option(callback=bounded(1, ITERS_MAX), help="Timed iterations (challenge: 100).")] = 100,
    stage_iters: Annotated[int, typer.Option(callback=bounded(1, ITERS_MAX), help="Timed iterations per stage.")] = 10,
    memory: Annotated[bool, typer.Option("--memory/--no-memory", help="Peak RSS per system in a subprocess.")] = True,
    isolate: Annotated[bool, typer.Option("--isolate", help="One process per system, one after another (reference, "
                                                            "engines, reference again to show drift), instead of "
                                                            "interleaved in one process: for models whose reference "
                                                            "and engine do not fit in RAM together (a 3B on 24 GB). "
                                                            "No generation runs.")] = False,
    batch_sizes: Annotated[str, typer.Option(help="Throughput batch sizes (greedy, --new-tokens each); empty = skip.")] = "1,4",
    new_tokens: Annotated[int, typer.Option(callback=bounded(1, MAX_NEW_TOKENS_LIMIT),
                                            help="Tokens generated per clip for the throughput runs.")] = 16,
    generation: Annotated[bool, typer.Option("--generation/--no-generation", help="Throughput, full beam-search "
                                                                                 "answer and clip end-to-end runs.")] = True,
    clip: Annotated[Path | None, typer.Option(help="Real clip for the end-to-end latency (default: a demo clip).")] = None,
    plot_out: Annotated[Path | None, typer.Option("--plot", help="Write a PNG chart here (needs matplotlib).")] = None,
    device: Annotated[str, typer.Option(callback=device_check(TORCH_DEVICES, cuda_index=False),
                                        help="cpu, or cuda: the reference under fp16 autocast with CUDA memory "
                                             "figures, engines on the CUDA execution provider.")] = "cpu",
    seed: Annotated[int, typer.Option(callback=bounded(0, SEED_MAX),
                                      help="Seed of the noise clip (the challenge's is unseeded).")] = 0,
    json_out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the full result JSON here.")] = None,
    markdown_out: Annotated[Path | None, typer.Option("--markdown", help="Write a markdown table here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the full result JSON instead of the markdown "
                                                          "table.")] = False,
):
    """Measure TTFT, TPOT, memory and stage times with the challenge's protocol, engines beside the reference.

    Engines and the reference are interleaved in one run, with engine/reference ratios and a
    memory-bandwidth roofline.

    Example: salmonn-export bench engines/demo-w4a16 --warmup 2 --iters 10 --out bench.json --markdown bench.md
    """
    import numpy as np
    from rich.progress import Progress

    from salmonn_export.bundle import read_manifest
    from salmonn_export.harness.bench import (
        machine,
        measure_memory_subprocess,
        memory_bandwidth_gbs,
        ratios,
        roofline,
        run_generation,
        run_protocol,
        run_stages,
    )
    from salmonn_export.harness.bench_systems import engine_system, reference_system

    if device not in ("cpu", "cuda"):
        raise SalmonnError("--device must be cpu or cuda")
    for target, what in ((json_out, "result JSON"), (markdown_out, "markdown table"), (plot_out, "chart")):
        if target is not None:  # before anything is measured
            check_output_file(target, what)
    try:  # every option is checked before anything is measured
        sizes = [int(x) for x in batch_sizes.split(",") if x.strip()]
    except ValueError:
        raise SalmonnError(f"--batch-sizes must be comma-separated integers, got {batch_sizes!r}") from None
    if any(b < 1 for b in sizes):
        raise SalmonnError(f"--batch-sizes must be >= 1 each, got {batch_sizes!r}")
    if device == "cuda":
        import torch

        if reference and not torch.cuda.is_available():
            raise SalmonnError("--device cuda: no CUDA device is visible to this torch build")
    for b in engines or []:
        if b.suffix == ".json" and not b.is_dir():
            raise SalmonnError("a .json file, not an engine bundle (`--json` is a flag now; write the result "
                               "with --out PATH)", b)
    bundles = list(engines) if engines else [engine_path(None)]
    config = model
    if reference and config is None:
        config = Path(read_manifest(bundles[0], verify_hashes=False)["source"]["config"])
    if isolate:
        from salmonn_export.harness.bench import run_isolated

        result = run_isolated(config if reference else None, bundles, audio_seconds, device, warmup, iters,
                              stage_iters, seed, console=err)
        _write_bench(result, json_out, markdown_out, plot_out, as_json)
        return
    wave = np.random.default_rng(seed).standard_normal(int(16000 * audio_seconds))
    systems = []
    if reference:
        systems.append(reference_system(config, wave, device))
    names = set()
    for b in bundles:
        system = engine_system(b, wave, device=device)
        if system.name in names:
            system.name = f"{system.name}@{b}"
        names.add(system.name)
        systems.append(system)
    with Progress(console=err, transient=True) as progress:
        task_id = progress.add_task("challenge protocol", total=warmup + iters)
        protocol = run_protocol(systems, wave, warmup, iters, lambda d, t: progress.update(task_id, completed=d))
    stages = run_stages(systems, min(warmup, 2), stage_iters)
    bandwidth = memory_bandwidth_gbs()
    mem = {}
    if memory:
        for s, target in zip(systems, ([str(config)] if reference else []) + [str(b) for b in bundles]):
            mem[s.name] = measure_memory_subprocess("reference" if s.name == "reference" else "engine", target,
                                                    audio_seconds, device)
    generation_result = None
    if generation:
        if clip is None:
            from salmonn_export.model.demo import demo_clips

            clip = demo_clips("asr")[0]
        with err.status("throughput, beam search and end-to-end runs..."):
            generation_result = run_generation(systems, wave, str(clip) if clip else None, sizes, new_tokens,
                                               repeats=2)
    context = 100  # prompt + 88 speech tokens, about what the first decode step sees
    result = {
        "settings": {"audio_seconds": audio_seconds, "warmup": warmup, "iters": iters, "stage_iters": stage_iters,
                     "seed": seed, "batch": 1, "device": device},
        "machine": machine(), "protocol": protocol, "ratios": ratios(protocol, "reference"), "stages": stages,
        "memory": mem, "bandwidth_gbs": bandwidth, "generation": generation_result,
        "weights_mb": {s.name: s.weight_bytes / 1e6 for s in systems},
        "sizes_mb_by_component": {s.name: s.sizes_mb for s in systems},
        "decoder_weight_mb": {s.name: s.decoder_bytes / 1e6 for s in systems},
        "roofline": {s.name: roofline(s, protocol[s.name]["tpot"]["median"], context, bandwidth) for s in systems},
    }
    for name, r in protocol.items():
        r["average_memory_usage_gb"] = mem.get(name, {}).get("average_memory_usage_gb")
    _write_bench(result, json_out, markdown_out, plot_out, as_json)


def _write_bench(result: dict, json_out: Path | None, markdown_out: Path | None, plot_out: Path | None,
                 as_json: bool) -> None:
    from salmonn_export.harness.bench import markdown, plot

    if json_out:
        from salmonn_export.bundle import write_json

        json_out.parent.mkdir(parents=True, exist_ok=True)
        write_json(json_out, result)
    if plot_out:
        why_not = plot(result, plot_out)
        if why_not:
            err.print(why_not)
    text = markdown(result)
    if markdown_out:
        markdown_out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(markdown_out, text)
    if as_json:
        print(json.dumps(result, indent=1, sort_keys=True, ensure_ascii=False, default=str))
    else:
        out.print(text, highlight=False)
