"""The demo training's pooled-window teacher (benchmarks/demo_model/reader.py, issue 17): distilling
it into the Q-Former is only sound if window k of both covers the same Whisper frames."""

import importlib
from pathlib import Path

import pytest
import torch

from salmonn_export.model.qformer import num_windows, qformer_windows

DEMO_TRAINING = Path(__file__).resolve().parents[1] / "benchmarks" / "demo_model"


@pytest.fixture()
def reader(monkeypatch):
    monkeypatch.syspath_prepend(str(DEMO_TRAINING))
    return importlib.import_module("reader")


@pytest.mark.parametrize("window", [6, 8, 17])
def test_teacher_windows_are_the_qformers(reader, window):
    frames, width = 1500, 12
    table = torch.randn(40, 16)
    teacher = reader.PoolTeacher(width, 16, table, blank=39, window=window)
    assert teacher.features(torch.zeros(2, frames, width)).shape == (2, num_windows(frames, window, window), 768)
    teacher.ln_speech, teacher.pool = torch.nn.Identity(), torch.nn.Identity()  # features = the window means
    for frame in (0, window - 1, window, 7 * window + 3, frames - 1):
        if frame >= num_windows(frames, window, window) * window:
            continue  # past the last whole window: neither side sees it
        marked = torch.zeros(1, frames, width)
        marked[0, frame] = 1.0
        pooled = teacher.features(marked)[0]
        qformer_side = qformer_windows(marked, window, window)  # [windows, window, width]
        assert pooled.abs().sum(-1).nonzero().flatten().tolist() == [frame // window]
        assert qformer_side.abs().sum((-1, -2)).nonzero().flatten().tolist() == [frame // window]


def test_teacher_head_starts_at_the_embeddings_with_the_pad_blank(reader):
    table = torch.randn(40, 16)
    teacher = reader.PoolTeacher(12, 16, table, blank=39, window=6)
    expected = torch.nn.functional.normalize(table, dim=-1) * reader.CTC_SCALE
    assert torch.allclose(teacher.head.weight, expected)
    assert teacher.head.bias[39] == 2.0 and teacher.head.bias[:39].abs().sum() == 0
    loss = teacher.ctc_loss(torch.randn(2, 1500, 12), [[1, 2, 3], [4, 5]])
    assert torch.isfinite(loss) and loss > 0
