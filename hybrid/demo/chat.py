"""How a question becomes the demo model's prompt, the same way for training, eval and the UI.

`chat_prompt` renders one user turn (an optional picture before the question) with the processor's
chat template and the assistant header; an answer is that prompt, the reply and `END`.
`conversation_segments` cuts a whole conversation into the prompt and answer pieces training needs.
"""

from __future__ import annotations

from hybrid.processor import hf_content

END = "<|im_end|>"


def chat_prompt(processor, question: str, with_image: bool) -> str:
    """The prompt text up to and including the assistant header, image pads still collapsed: the
    picture (if any) goes before the question, as the app and the CLI send it."""
    return conversation_prompt(processor, [question], [], with_image)


def conversation_prompt(processor, questions: list[str], answers: list[str], with_image: bool) -> str:
    """The prompt of the last question of a conversation: every earlier question with its answer
    (`len(answers) == len(questions) - 1`), the picture in the first user turn."""
    messages = []
    for i, question in enumerate(questions):
        messages.append({"role": "user", "content": hf_content(question, images=int(with_image and i == 0))})
        if i < len(answers):
            messages.append({"role": "assistant", "content": answers[i]})
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def conversation_segments(processor, questions: list[str], answers: list[str], with_image: bool) -> list[str]:
    """The conversation's text as alternating pieces: prompt, answer + `END`, prompt, ... Their
    concatenation is the chat template's rendering of the whole conversation, so the model trains
    on exactly the prompts the app sends for follow-ups."""
    segments, text = [], ""
    for i in range(len(questions)):
        prompt = conversation_prompt(processor, questions[: i + 1], answers[:i], with_image)
        if not prompt.startswith(text):
            raise ValueError("the chat template does not render a conversation as a prefix of its continuation")
        segments += [prompt[len(text) :], answers[i] + END]
        text = prompt + answers[i] + END
    return segments
