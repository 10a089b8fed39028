"""Output paths and compressed submissions: every output path that cannot take the output (an existing
folder for a file, an existing file for a folder, a file in the parent chain, a place that cannot be
written) is one line `error: PATH: problem`, exit 2, nothing left behind; submission CSVs are read
(and written) compressed as pandas' `read_csv(path)` infers from the extension."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import os
import tarfile
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from test_cli_conventions import assert_one_line_error, cli  # tests/ is on sys.path

from salmonn_export.errors import SalmonnError
from salmonn_export.files import atomic_dir, atomic_write_text, check_output_dir, check_output_file
from salmonn_export.harness.submission import read_submission, write_submission

CSV = "testset_id,text\ntest0000,hello world\ntest0001,good morning\n"
ROWS = [("test0000", "hello world"), ("test0001", "good morning")]


def _annotation(tmp_path: Path) -> Path:
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"annotation": [{"testset_id": f"test{i:04d}", "path": f"{i}.wav", "task": "asr",
                                                "text": t} for i, (_, t) in enumerate(ROWS)]}))
    return path


def _parts(tmp_path: Path) -> list[Path]:
    p1, p2 = tmp_path / "p1.csv", tmp_path / "p2.csv"
    p1.write_text("testset_id,text\ntest0000,hello world\n")
    p2.write_text("testset_id,text\ntest0001,good morning\n")
    return [p1, p2]


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --- file outputs ---------------------------------------------------------------------------------

def test_merge_onto_a_folder(tmp_path, capsys):  # F1
    target = tmp_path / "existing"
    target.mkdir()
    code, _, stderr = cli(capsys, "merge", *_parts(tmp_path), "--out", target)
    assert_one_line_error(code, stderr, str(target), "is a folder, not a file")
    assert list(target.iterdir()) == [] and _hidden(tmp_path) == []


def test_merge_onto_proc(tmp_path, capsys):  # F2
    code, _, stderr = cli(capsys, "merge", *_parts(tmp_path), "--out", "/proc/x.csv")
    assert_one_line_error(code, stderr, "/proc/x.csv", "cannot write here")


def test_merge_under_a_file(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, stderr = cli(capsys, "merge", *_parts(tmp_path), "--out", blocker / "sub.csv")
    assert_one_line_error(code, stderr, str(blocker / "sub.csv"), "is a file, not a folder")


def test_merge_into_a_new_folder_still_works(tmp_path, capsys):
    target = tmp_path / "new" / "deeper" / "sub.csv"
    code, _, stderr = cli(capsys, "merge", *_parts(tmp_path), "--out", target)
    assert code in (0, None), stderr
    assert read_submission(target) == ROWS
    assert _hidden(target.parent) == []


def test_eval_onto_a_folder_checks_before_any_work(tmp_path, capsys):  # F3
    target = tmp_path / "existing"
    target.mkdir()
    code, _, stderr = cli(capsys, "eval", "--task", "asr", "--engine", tmp_path / "no-engine",
                          "--annotation", _annotation(tmp_path), "--out", target)
    assert_one_line_error(code, stderr, str(target), "is a folder, not a file")
    assert list(target.iterdir()) == []
    assert not list(tmp_path.glob("*.partial.jsonl"))


def test_eval_onto_proc(tmp_path, capsys):
    code, _, stderr = cli(capsys, "eval", "--task", "asr", "--engine", tmp_path / "no-engine",
                          "--annotation", _annotation(tmp_path), "--out", "/proc/x.csv")
    assert_one_line_error(code, stderr, "/proc/x.csv", "cannot write here")


def test_verify_report_onto_a_folder(tmp_path, capsys):  # F4
    target = tmp_path / "existing"
    target.mkdir()
    code, _, stderr = cli(capsys, "verify", tmp_path / "no-bundle", "--model", tmp_path / "c.yaml",
                          "--data", _annotation(tmp_path), "--report", target)
    assert_one_line_error(code, stderr, str(target), "is a folder, not a file")


def test_bench_out_onto_a_folder(tmp_path, capsys):
    target = tmp_path / "existing"
    target.mkdir()
    code, _, stderr = cli(capsys, "bench", tmp_path / "no-bundle", "--out", target)
    assert_one_line_error(code, stderr, str(target), "is a folder, not a file")


@pytest.mark.parametrize("writer", ["atomic_write_text", "write_submission"])
def test_shared_file_writers(tmp_path, writer):
    write = (lambda p: atomic_write_text(p, "x")) if writer == "atomic_write_text" else \
        (lambda p: write_submission(p, ROWS))
    folder = tmp_path / "existing"
    folder.mkdir()
    for target, problem in ((folder, "is a folder, not a file"), (Path("/proc/x.csv"), "cannot write here"),
                            (tmp_path / "f" / "x.csv", "is a file, not a folder")):
        (tmp_path / "f").write_text("") if not (tmp_path / "f").exists() else None
        with pytest.raises(SalmonnError) as info:
            write(target)
        assert problem in str(info.value) and info.value.path == str(target)
    assert _hidden(tmp_path) == [] and list(folder.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_parent(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(SalmonnError, match="Permission denied"):
            check_output_file(locked / "x.csv")
        with pytest.raises(SalmonnError, match="Permission denied"):
            check_output_dir(locked / "out")
    finally:
        locked.chmod(0o755)


# --- folder outputs -------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["tiny", "demo-data"])
def test_folder_commands_onto_a_file(tmp_path, capsys, command):  # F-weak
    target = tmp_path / "empty-file"
    target.write_text("")
    code, _, stderr = cli(capsys, command, target)
    assert_one_line_error(code, stderr, str(target), "is a file, not a folder")
    code, _, stderr = cli(capsys, command, target, "--force")
    assert_one_line_error(code, stderr, str(target), "is a file, not a folder")
    assert target.is_file() and _hidden(tmp_path) == []


def test_build_out_onto_a_file(tmp_path, capsys):
    target = tmp_path / "bundle"
    target.write_text("")
    code, _, stderr = cli(capsys, "build", "--out", target)
    assert_one_line_error(code, stderr, str(target), "is a file, not a folder")


def test_atomic_dir_under_proc_and_under_a_file(tmp_path):
    blocker = tmp_path / "f"
    blocker.write_text("")
    for target, problem in ((Path("/proc/new-folder"), "cannot write here"), (blocker / "out", "is a file")):
        with pytest.raises(SalmonnError, match=problem):
            with atomic_dir(target):
                raise AssertionError("not reached")
    assert _hidden(tmp_path) == []


# --- compressed submissions (F8) ------------------------------------------------------------------

def _zip(data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("sub.csv", data)
    return buf.getvalue()


def _tar(data: bytes, compression: str = "") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=f"w:{compression}") as tf:
        info = tarfile.TarInfo("sub.csv")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


COMPRESSED = {
    "sub.csv.gz": gzip.compress, "sub.csv.bz2": bz2.compress, "sub.csv.xz": lzma.compress, "sub.csv.zip": _zip,
    "SUB.CSV.GZ": gzip.compress, "sub.tar": _tar, "sub.tar.gz": lambda d: _tar(d, "gz"),
}


@pytest.mark.parametrize("name", sorted(COMPRESSED))
def test_compressed_submissions_pandas_reads_are_read(tmp_path, capsys, name):
    path = tmp_path / name
    path.write_bytes(COMPRESSED[name](("\ufeff" + CSV).encode()))
    assert list(pd.read_csv(path)["text"]) == [t for _, t in ROWS]  # the challenge's reader
    assert read_submission(path) == ROWS
    code, stdout, stderr = cli(capsys, "validate-submission", path)
    assert code in (0, None) and "valid" in stdout, stderr
    code, stdout, stderr = cli(capsys, "score", "--task", "asr", "--submission", path,
                               "--annotation", _annotation(tmp_path))
    assert code in (0, None) and "WER: 0.0000%" in stdout, stderr


@pytest.mark.parametrize("name", ["sub.csv.gz", "sub.csv.bz2", "sub.csv.xz", "sub.csv.zip"])
def test_merge_reads_and_writes_compressed(tmp_path, capsys, name):
    p1, p2 = _parts(tmp_path)
    gz = tmp_path / "p1.csv.gz"
    gz.write_bytes(gzip.compress(p1.read_bytes()))
    target = tmp_path / name
    code, _, stderr = cli(capsys, "merge", gz, p2, "--out", target)
    assert code in (0, None), stderr
    assert list(pd.read_csv(target)["text"]) == [t for _, t in ROWS]
    assert _hidden(tmp_path) == []


@pytest.mark.parametrize("compress, kind", [(gzip.compress, "gzip"), (bz2.compress, "bz2"), (lzma.compress, "xz"),
                                            (_zip, "zip")])
def test_compressed_file_not_named_so_is_refused_clearly(tmp_path, capsys, compress, kind):
    path = tmp_path / "sub.csv"
    path.write_bytes(compress(CSV.encode()))
    code, _, stderr = cli(capsys, "score", "--task", "asr", "--submission", path, "--annotation", _annotation(tmp_path))
    line = assert_one_line_error(code, stderr, str(path), f"looks {kind}-compressed")
    assert "byte 0x" not in line


def test_named_compressed_but_is_not(tmp_path, capsys):
    path = tmp_path / "sub.csv.gz"
    path.write_text(CSV)
    code, _, stderr = cli(capsys, "merge", path, "--out", tmp_path / "out.csv")
    assert_one_line_error(code, stderr, str(path), "cannot be decompressed")


def test_zst_needs_zstandard(tmp_path):
    path = tmp_path / "sub.csv.zst"
    try:
        import zstandard
    except ImportError:
        path.write_bytes(b"\x28\xb5\x2f\xfd" + b"\0" * 8)
        with pytest.raises(SalmonnError, match="zstandard"):
            read_submission(path)
    else:
        path.write_bytes(zstandard.ZstdCompressor().compress(CSV.encode()))
        assert read_submission(path) == ROWS


def test_stale_temp_folders_of_killed_builds_are_removed(tmp_path):
    """A build killed outright (SIGKILL from the OOM killer) leaves `.NAME.building-<host>-<pid>-X`;
    the next atomic_dir for that output removes it with a warning, while folders of a live process
    and of another host are kept."""
    import socket
    import subprocess
    import sys
    import warnings

    from salmonn_export.errors import SalmonnWarning
    from salmonn_export.files import atomic_dir

    host = socket.gethostname().replace("-", "_")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    out = tmp_path / "bundle"
    stale = tmp_path / f".bundle.building-{host}-{dead_pid}-deadbeef"
    live = tmp_path / f".bundle.building-{host}-{os.getpid()}-0badf00d"
    other_host = tmp_path / f".bundle.building-otherhost-{dead_pid}-12345678"
    for folder in (stale, live, other_host):
        folder.mkdir()
        (folder / "decoder.onnx.data").write_bytes(b"x" * 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with atomic_dir(out, force=True) as tmp:
            (tmp / "manifest.json").write_text("{}")
    assert not stale.exists() and live.is_dir() and other_host.is_dir()
    assert (out / "manifest.json").is_file()
    assert [str(w.message) for w in caught if issubclass(w.category, SalmonnWarning)] == [
        f"removed {stale}: left by a build (process {dead_pid}) that was killed before it could clean up"]
