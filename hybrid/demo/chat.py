"""How a question becomes the demo model's prompt, the same way for training, eval and the UI.

`chat_prompt` renders one user turn (an optional picture before the question) with the processor's
chat template and the assistant header; an answer is that prompt, the reply and `END`.
"""

from __future__ import annotations

END = "<|im_end|>"


def user_messages(question: str, with_image: bool) -> list[dict]:
    """The one-turn conversation: the picture (if any) goes before the question, as in the app."""
    content: list[dict] = [{"type": "image"}] if with_image else []
    content.append({"type": "text", "text": question})
    return [{"role": "user", "content": content}]


def chat_prompt(processor, question: str, with_image: bool) -> str:
    """The prompt text up to and including the assistant header, image pads still collapsed."""
    messages = user_messages(question, with_image)
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
