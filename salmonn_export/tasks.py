"""Task names and prompt templating, shared by the reference, the runtime and the harness (no torch).

On the command line tasks are `asr` and `aac`; annotations and prompt files use the challenge's keys
(`asr`, `audiocaption_v2`, ...). Any other key of the prompt file is accepted as is.
"""

from __future__ import annotations

import difflib

from salmonn_export.errors import SalmonnError

TASK_KEYS = {"asr": "asr", "aac": "audiocaption_v2"}


def task_key(task: str) -> str:
    """Command-line task → prompt/annotation key (`aac` → `audiocaption_v2`)."""
    return TASK_KEYS.get(task, task)


def short_task(key: str) -> str:
    """Annotation task key → command-line task name (`audiocaption_v2` → `aac`)."""
    return {v: k for k, v in TASK_KEYS.items()}.get(key, key)


def templated_prompt(prompts: dict[str, str], task: str, template: str) -> str:
    """`prompt_template.format(test_prompt[task])`; `{}` placeholders stay unfilled, as in evaluate_salmonn."""
    key = task_key(task)
    if key not in prompts:
        known = dict.fromkeys(["asr", "aac", *(short_task(k) for k in sorted(prompts))])  # once each, in order
        guess = [k for k in known if k.lower() == task.lower()] or difflib.get_close_matches(task, list(known), n=1)
        hint = f" (did you mean `{guess[0]}`?)" if guess else ""
        raise SalmonnError(f"unknown task `{task}`{hint}; a task is asr, aac or a key of the prompt file; "
                           "known: " + ", ".join(known))
    prompt = prompts[key]
    return template.format(prompt) if template else prompt
