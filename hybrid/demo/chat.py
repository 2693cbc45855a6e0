"""How a question becomes the demo model's prompt, the same way for training, eval and the UI.

`chat_prompt` renders one user turn (an optional picture before the question) with the processor's
chat template and the assistant header; an answer is that prompt, the reply and `END`.
"""

from __future__ import annotations

from hybrid.processor import hf_content

END = "<|im_end|>"


def chat_prompt(processor, question: str, with_image: bool) -> str:
    """The prompt text up to and including the assistant header, image pads still collapsed: the
    picture (if any) goes before the question, as the app and the CLI send it."""
    messages = [{"role": "user", "content": hf_content(question, images=int(with_image))}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
