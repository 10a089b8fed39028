"""Task prompts: the challenge's `test_prompt.json` (shipped), or the config's `test_prompt_path`.

Task names and templating live in `salmonn_export.tasks` (shared with the runtime).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from salmonn_export.errors import SalmonnError

SPEECH_PLACEHOLDER = "<SpeechHere>"


def builtin_test_prompts() -> dict[str, str]:
    return json.loads(resources.files("salmonn_export.model").joinpath("test_prompt.json").read_text(encoding="utf-8"))


def config_prompts(config) -> dict[str, str]:
    """The task → prompt map a SalmonnConfig's model uses: its `test_prompt_path`, else the challenge's
    shipped `test_prompt.json`. Raises SalmonnError for a missing or malformed file."""
    m = config.model
    return load_prompt_file(config.resolve(m.test_prompt_path)) if m.test_prompt_path else builtin_test_prompts()


def load_prompt_file(path: str | Path) -> dict[str, str]:
    """A prompt JSON of task → prompt (or → list of prompts, as training files hold; the first is used)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise SalmonnError("prompt file not found", path) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise SalmonnError(f"prompt file is not valid JSON ({exc})", path) from None
    if not isinstance(data, dict):
        raise SalmonnError("prompt file must map task names to prompts", path)
    prompts = {}
    for task, value in data.items():
        if isinstance(value, list):
            value = next((v for v in value if isinstance(v, str) and SPEECH_PLACEHOLDER in v), None)
        if not isinstance(value, str) or SPEECH_PLACEHOLDER not in value:
            raise SalmonnError(f"prompt for task `{task}` has no {SPEECH_PLACEHOLDER}", path)
        prompts[task] = value
    return prompts
