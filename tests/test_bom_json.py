"""Hand-edited JSON inputs saved with a UTF-8 byte-order mark (Windows Notepad, Excel exports) load
like the same file without it: annotations and prompt files."""

import json

import pytest

from salmonn_export.dataset import read_annotation
from salmonn_export.model.prompts import load_prompt_file


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_annotation_with_or_without_bom(tmp_path, audio_dir, bom):
    ann = {"annotation": [{"testset_id": "t0", "path": str(audio_dir / "speech_a.wav"), "task": "asr", "text": "hi"}]}
    path = tmp_path / "ann.json"
    path.write_bytes(bom + json.dumps(ann).encode())
    items = read_annotation(path)
    assert [(i.testset_id, i.text) for i in items] == [("t0", "hi")]


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_prompt_file_with_or_without_bom(tmp_path, bom):
    path = tmp_path / "prompts.json"
    path.write_bytes(bom + json.dumps({"asr": "<Speech><SpeechHere></Speech> Recognize."}).encode())
    assert load_prompt_file(path)["asr"].endswith("Recognize.")
