"""Thinking checkpoints: the reply's `<think>` part is shown apart, counted, and never sent back."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from hybrid.config import SamplingConfig
from hybrid.layout import PROCESSOR_DIR
from hybrid.metrics import Stopwatch
from hybrid.pipeline import Pipeline
from hybrid.routes.common import Emitter
from hybrid.thinking import opens_thinking, split_thinking
from tests.page import last, make_service, named, session, settings
from web.view import Question, Reply, RouteRun, to_chatbot, to_request

# The test models' template, with Qwen3-VL-Thinking's habits: the generation prompt opens `<think>`,
# and an earlier answer is sent without its thinking.
THINKING_TEMPLATE = (
    "{%- for message in messages -%}{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'].split('</think>')[-1] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'].split('</think>')[-1] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{{- '<|im_end|>\\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n<think>\\n' -}}{%- endif -%}"
)


def test_a_reply_splits_into_thinking_and_answer():
    assert split_thinking("The shape has 3 corners.</think>\n\nA triangle.", True) == (
        "The shape has 3 corners.",
        "A triangle.",
    )
    assert split_thinking("<think>hmm</think>Yes.", False) == ("hmm", "Yes.")
    assert split_thinking("still going", True) == ("still going", "")  # not closed yet: all thinking
    assert split_thinking("A plain answer.", False) == (None, "A plain answer.")
    assert opens_thinking("<|im_start|>assistant\n<think>\n")
    assert not opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # thinking switched off
    assert not opens_thinking("<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def thinking_pipeline(bundle, tmp_path_factory):
    """The base bundle with a Thinking chat template."""
    copy = tmp_path_factory.mktemp("thinking") / "bundle"
    shutil.copytree(bundle("base"), copy)
    config = copy / PROCESSOR_DIR / "tokenizer_config.json"
    (copy / PROCESSOR_DIR / "chat_template.jinja").write_text(THINKING_TEMPLATE)
    settings = json.loads(config.read_text())
    settings.pop("chat_template", None)
    config.write_text(json.dumps(settings))
    return Pipeline.load(copy, verify=False, only=("hybrid",))


def test_the_pipeline_knows_a_thinking_template(thinking_pipeline, pipeline):
    assert thinking_pipeline.opens_thinking and not pipeline("base").opens_thinking


def test_the_thinking_is_shown_collapsed_and_left_out_of_the_next_prompt(thinking_pipeline):
    service = make_service(thinking_pipeline)
    chosen = settings("hybrid", (6.0, 0.0, 1.0, 0.0, 1.0, 0.0))
    updates = [named(service, u) for u in service.chat({"text": "Hello!", "files": []}, [], chosen, [], session("t"))]
    answer = last(updates, "turns")[-1]
    assert answer.thinking and answer.text == ""  # a random model never closes its thinking
    bubble = last(updates, "chatbot")[-2]
    assert bubble["metadata"]["title"] == "Thinking" and bubble["content"] == answer.thinking

    turns = [Question("Hello!"), Reply("Hi there.", thinking="They greet me.")]
    request = to_request([*turns, Question("Bye?")], SamplingConfig())
    assert [m.text for m in request.messages] == ["Hello!", "Hi there.", "Bye?"]
    prompt = thinking_pipeline.routes["hybrid"].processor.render(request.messages)
    assert "They greet me." not in prompt and prompt.endswith("<think>\n")
    shown = to_chatbot(turns)
    assert [b.get("metadata", {}).get("title") for b in shown] == [None, "Thinking", None]


def test_a_route_run_splits_a_closed_thinking():
    run = RouteRun("hybrid")
    run.text = "Three corners, so a triangle.</think>\n\nA triangle."
    turn = run.turn(opens_thinking=True)
    assert (turn.thinking, turn.text) == ("Three corners, so a triangle.", "A triangle.")


def test_thinking_tokens_are_counted(thinking_pipeline):
    """The emitter counts the tokens up to and including the one that closes the thinking."""
    processor = thinking_pipeline.routes["hybrid"].processor
    thought = processor.tokenizer("a b</think>", add_special_tokens=False)["input_ids"]
    answer = processor.tokenizer(" done", add_special_tokens=False)["input_ids"]
    watch = Stopwatch()
    emitter = Emitter("hybrid", processor, SamplingConfig(max_new_tokens=64), watch)
    for token in [*thought, *answer]:
        emitter.push(int(token))
    assert watch.timings().thinking_tokens == len(thought) > 0
    assert np.isclose(watch.timings().decode_tokens, len(thought) + len(answer))
