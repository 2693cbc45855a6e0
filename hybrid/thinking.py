"""Thinking checkpoints (Qwen3-VL-*-Thinking): a reply is `<think>...</think>` and then the answer.

Their chat template opens the `<think>` block in the generation prompt, so the reply starts inside
it and only `</think>` shows where the answer begins. The thinking is shown apart (collapsed) and,
as those templates do, left out of the next turn's prompt.
"""

from __future__ import annotations

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def opens_thinking(generation_prompt: str) -> bool:
    """Whether a rendered prompt ends inside an open `<think>` block (a Thinking template)."""
    opened = generation_prompt.rfind(THINK_OPEN)
    return opened != -1 and THINK_CLOSE not in generation_prompt[opened:]


def split_thinking(text: str, opened: bool) -> tuple[str | None, str]:
    """`(thinking, answer)` of a reply; thinking is None when the reply has none. `opened`: the
    prompt opened the block, so a reply without `</think>` (yet) is all thinking."""
    if THINK_CLOSE in text:
        thinking, _, answer = text.partition(THINK_CLOSE)
        return thinking.replace(THINK_OPEN, "", 1).strip(), answer.strip()
    if opened or text.lstrip().startswith(THINK_OPEN):
        return text.replace(THINK_OPEN, "", 1).strip(), ""
    return None, text
