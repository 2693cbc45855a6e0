"""Conversation reuse: a follow-up that reuses the kept KV cache answers exactly like a fresh
prefill (hybrid with images in either turn, GenAI for greedy text), the kept caches stay within
their budget, and Clear or the end of a session drops them."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace

import numpy as np
import pytest

from hybrid.conversation import POOL, ConversationStore, ImageRun, Kept, reusable_prefix
from hybrid.limits import RateLimiter
from hybrid.media import IMAGE
from hybrid.types import Message
from tests.conftest import draw_scene
from tests.helpers import ask, run
from tests.page import chat_updates, last, make_service, session, settings
from web.admission import Admission

RED = draw_scene((96, 96), (200, 30, 30))
BLUE = draw_scene((128, 64), (30, 30, 200), (0.2, 0.5, 0.9, 0.9))
FIRST = "What is in this picture?"
GREEDY = (8.0, 0.0, 1.0, 0.0, 1.0, 0.0)  # the page's sampling controls: 8 new tokens, greedy


def conversation(pipe, route: str, second_images=(), cid: str = "c1", model_images=(RED,), **sampling):
    """Turn 1 (kept under `cid`), then turn 2 as a (request, reused result) pair."""
    first = replace(ask(FIRST, model_images, **sampling), conversation_id=cid)
    answer = run(pipe, first, route)
    history = (Message("user", FIRST, tuple(model_images)), Message("assistant", answer["text"]))
    second = replace(ask("And where is it?", second_images, history=history, **sampling), conversation_id=cid)
    return second, answer


class LogitRecorder:
    """Records the logits every decoder call of the hybrid route returns."""

    def __init__(self, decoder, monkeypatch) -> None:
        self.rows: list[np.ndarray] = []
        forward = decoder.forward

        def recording(*args):
            logits = forward(*args)
            self.rows.append(logits)
            return logits

        monkeypatch.setattr(decoder, "forward", recording)

    def take(self) -> np.ndarray:
        rows, self.rows = np.stack(self.rows), []
        return rows


@pytest.mark.parametrize("case", ["image in turn 1", "new image in turn 2"])
def test_hybrid_follow_up_equals_a_fresh_prefill(pipeline, monkeypatch, case):
    pipe = pipeline("base")
    route = pipe.routes["hybrid"]
    second, _ = conversation(pipe, "hybrid", (BLUE,) if case == "new image in turn 2" else (), cid=case)
    first_image_end = route.processor.prepare(second.messages).spans(IMAGE)[0][1]
    recorder = LogitRecorder(route.decoder, monkeypatch)
    reused = run(pipe, second, "hybrid")
    reused_logits = recorder.take()
    fresh = run(pipe, replace(second, conversation_id=None), "hybrid")
    fresh_logits = recorder.take()
    assert reused["timings"]["reused_tokens"] >= first_image_end, "turn 1's picture should come from the cache"
    assert fresh["timings"]["reused_tokens"] == 0
    assert reused["timings"]["image_tokens"] == fresh["timings"]["image_tokens"]
    assert reused["token_ids"] == fresh["token_ids"] and len(set(fresh["token_ids"])) > 5
    np.testing.assert_allclose(reused_logits, fresh_logits, atol=1e-4, rtol=0)
    assert reused["token_ids"] == run(pipe, second, "pytorch")["token_ids"]


@pytest.mark.parametrize("route", ["hybrid", "genai"])
def test_a_pooled_follow_up_finds_its_own_conversation_among_others(pipeline, route):
    """Stateless clients: no conversation id of their own, the longest kept prefix is reused."""
    pipe = pipeline("base")
    images = (RED,) if route == "hybrid" else ()
    pool = POOL + f"test-{route}"
    run(pipe, replace(ask("Hello there, who are you?", ()), conversation_id=pool), route)  # another conversation
    second, answer = conversation(pipe, route, cid=pool, model_images=images, min_new_tokens=0)
    reused = run(pipe, second, route)
    fresh = run(pipe, replace(second, conversation_id=None), route)
    assert reused["timings"]["reused_tokens"] >= answer["timings"]["prompt_tokens"] - 1
    assert reused["token_ids"] == fresh["token_ids"] and len(fresh["token_ids"]) > 3
    pipe.forget(pool)


def test_a_different_picture_in_the_same_place_is_not_reused(pipeline):
    """Image tokens share one id: only the pixels tell two pictures apart."""
    pipe = pipeline("base")
    second, _ = conversation(pipe, "hybrid", cid="swap")
    green = replace(second.messages[0], images=(draw_scene((96, 96), (30, 200, 30)),))
    swapped = replace(second, messages=(green, *second.messages[1:]))
    image_start = pipe.routes["hybrid"].processor.prepare(swapped.messages).spans(IMAGE)[0][0]
    result = run(pipe, swapped, "hybrid")
    assert result["timings"]["reused_tokens"] == image_start
    assert result["token_ids"] == run(pipe, replace(swapped, conversation_id=None), "hybrid")["token_ids"]


def test_genai_follow_up_continues_its_generator(pipeline):
    pipe = pipeline("base")
    greedy = dict(min_new_tokens=0)  # a continued generator cannot change its minimum length
    second, answer = conversation(pipe, "genai", cid="text", model_images=(), **greedy)
    reused = run(pipe, second, "genai")
    fresh = run(pipe, replace(second, conversation_id=None), "genai")
    assert reused["timings"]["reused_tokens"] >= answer["timings"]["prompt_tokens"] - 1
    assert reused["token_ids"] == fresh["token_ids"] and len(fresh["token_ids"]) > 3
    sampled = replace(second, sampling=replace(second.sampling, temperature=0.7))
    assert run(pipe, sampled, "genai")["timings"]["reused_tokens"] == 0, "a sampled request starts afresh"


def test_kept_caches_stay_within_a_tiny_budget(pipeline, monkeypatch):
    pipe = pipeline("base")
    store = pipe.conversations
    monkeypatch.setattr(store, "_entries", OrderedDict())  # none of the other tests' conversations
    conversation(pipe, "hybrid", cid="a")
    one = store.nbytes
    assert ("a", "hybrid") in store and one > 0
    monkeypatch.setattr(store, "budget", one * 3 // 2)  # room for one conversation, not two
    second_of_a, _ = conversation(pipe, "hybrid", cid="a")
    conversation(pipe, "hybrid", cid="b")
    assert ("b", "hybrid") in store and ("a", "hybrid") not in store, "the least recently used goes"
    assert store.nbytes <= store.budget
    assert run(pipe, second_of_a, "hybrid")["timings"]["reused_tokens"] == 0
    store.forget("a")
    store.forget("b")
    monkeypatch.setattr(store, "budget", one // 2)
    conversation(pipe, "hybrid", cid="c")
    assert len(store) == 0, "a cache larger than the whole budget is not kept"


def test_store_evicts_least_recently_used_first():
    store = ConversationStore(budget_mb=1)
    entry = lambda mb: Kept(np.zeros(1, dtype=np.int64), (), None, int(mb * 2**20))  # noqa: E731
    store.keep("hybrid", "a", entry(0.4))
    store.keep("hybrid", "b", entry(0.4))
    store.keep("hybrid", "a", store.take("hybrid", "a", np.zeros(1, dtype=np.int64)))  # used again: now the most recent
    store.keep("genai", "c", entry(0.4))
    assert ("b", "hybrid") not in store and ("a", "hybrid") in store and ("c", "genai") in store
    assert store.nbytes <= store.budget
    assert store.forget("a") == 1 and len(store) == 1


def test_a_pool_gives_each_request_the_cache_with_its_longest_prefix():
    store = ConversationStore(budget_mb=1)
    pool = POOL + "api"
    for ids in ([1, 2, 3, 4], [1, 2, 7, 8, 9], [5, 6]):
        store.keep("hybrid", pool, Kept(np.array(ids), (), tuple(ids), 10))
    assert len(store) == 3, "a pool keeps every request's cache beside the others"
    assert store.take("hybrid", pool, np.array([1, 2, 7, 8, 9, 10])).state == (1, 2, 7, 8, 9)
    assert store.take("genai", pool, np.array([1, 2, 3, 4, 5])) is None, "per route"
    assert store.take("hybrid", pool, np.array([9, 9])) is None, "nothing shared: no cache taken"
    assert store.take("hybrid", pool, np.array([1, 2, 3, 4, 5])).state == (1, 2, 3, 4)
    assert store.forget(pool) == 1 and len(store) == 0


def test_reusable_prefix_stops_where_ids_or_pictures_differ():
    kept = Kept(np.array([1, 2, 9, 9, 3, 4, 5]), (ImageRun(2, 4, "red"),), None, 0)
    same = (ImageRun(2, 4, "red"),)
    assert reusable_prefix(kept, np.array([1, 2, 9, 9, 3, 4, 5, 6, 7]), same) == 7
    assert reusable_prefix(kept, np.array([1, 2, 9, 9, 3, 8, 5, 6]), same) == 5
    assert reusable_prefix(kept, np.array([1, 2, 9, 9, 3, 4, 5, 6]), (ImageRun(2, 4, "blue"),)) == 2
    assert reusable_prefix(kept, np.array([1, 2, 9, 9, 3]), same) == 4, "the last prompt token is prefilled"
    assert reusable_prefix(None, np.array([1, 2]), ()) == 0


def test_clear_and_the_end_of_a_session_drop_the_cache(pipeline):
    pipe = pipeline("base")
    service = make_service(pipe)
    message = {"text": FIRST, "files": []}
    updates = chat_updates(service, message, route="hybrid", sampling=GREEDY, name="clearing")
    assert ("clearing", "hybrid") in pipe.conversations
    turns = last(updates, "turns")
    follow = chat_updates(service, {"text": "And then?", "files": []}, turns, "hybrid", GREEDY, name="clearing")
    assert last(follow, "latency")["reused tokens"].iloc[0] > 0, "the latency table shows the reused tokens"
    service.clear(session("clearing"))
    assert ("clearing", "hybrid") not in pipe.conversations
    chat_updates(service, message, route="hybrid", sampling=GREEDY, name="clearing")
    service.end_session(session("clearing"))
    assert ("clearing", "hybrid") not in pipe.conversations


@pytest.mark.parametrize(
    "case, precision", [("picture in turn 1", "fp32"), ("new picture in turn 2", "fp32"), ("picture in turn 1", "int4")]
)
def test_a_warmed_picture_answers_as_a_fresh_prefill(pipeline, monkeypatch, case, precision):
    """`Pipeline.warm` prefills the prompt through its last picture before the question is known; the
    question then prefills only its own tokens and answers exactly as a fresh prefill does (INT4:
    the int8 prompt pass, in two passes against one)."""
    pipe = pipeline("base", precision)
    route = pipe.routes["hybrid"]
    if case == "picture in turn 1":
        question, history = replace(ask(FIRST, (RED,)), conversation_id=case), ()
    else:
        question, _ = conversation(pipe, "hybrid", (BLUE,), cid=case)
        history = question.messages[:-1]
    ahead = replace(ask("", question.messages[-1].images, history=history), conversation_id=case)
    picture_end = route.processor.prepare(question.messages).media_end()
    warmed = pipe.warm(ahead)
    assert 0 < warmed <= picture_end
    assert pipe.warm(ahead) == 0, "a second warm-up finds the picture in the kept cache"
    recorder = LogitRecorder(route.decoder, monkeypatch)
    answer = run(pipe, question, "hybrid")
    answer_logits = recorder.take()
    fresh = run(pipe, replace(question, conversation_id=None), "hybrid")
    fresh_logits = recorder.take()
    assert answer["timings"]["reused_tokens"] >= picture_end
    assert answer["token_ids"] == fresh["token_ids"] and len(set(fresh["token_ids"])) > 5
    np.testing.assert_allclose(answer_logits, fresh_logits, atol=1e-4, rtol=0)


def test_warm_needs_a_conversation_and_a_picture(pipeline):
    pipe = pipeline("base")
    assert pipe.warm(ask("", (RED,))) == 0, "without a conversation there is nothing to keep it for"
    assert pipe.warm(replace(ask(FIRST), conversation_id="no picture")) == 0
    assert ("no picture", "hybrid") not in pipe.conversations


def test_the_page_warms_an_added_picture_for_hybrid_only(pipeline, tmp_path):
    pipe = pipeline("base")
    service = make_service(pipe)
    picture = tmp_path / "red.png"
    RED.save(picture)
    added = {"text": "", "files": [str(picture)]}
    service.warm(added, [], settings("pytorch", GREEDY), session("reference"))
    assert ("reference", "hybrid") not in pipe.conversations, "PyTorch answers: nothing to warm"
    service.warm(added, [], settings("auto", GREEDY), session("warm"))
    assert ("warm", "hybrid") in pipe.conversations
    updates = chat_updates(service, {**added, "text": FIRST}, route="auto", sampling=GREEDY, name="warm")
    image_end = pipe.routes["hybrid"].processor.prepare(ask(FIRST, (RED,)).messages).media_end()
    assert last(updates, "latency")["reused tokens"].iloc[0] >= image_end
    unreadable = {"text": "", "files": [__file__]}  # reported when the question is sent, not here
    service.warm(unreadable, [], settings("auto", GREEDY), session("unreadable"))
    assert ("unreadable", "hybrid") not in pipe.conversations


def test_a_warm_up_counts_against_the_client_rate(pipeline, tmp_path):
    """Adding pictures cannot keep the CPU busier than asking could: over the rate, no warm-up."""
    pipe = pipeline("base")
    service = make_service(pipe, admission=Admission(RateLimiter(1, 60.0)))
    picture = tmp_path / "red.png"
    RED.save(picture)
    added = {"text": "", "files": [str(picture)]}
    service.warm(added, [], settings("auto", GREEDY), session("first", host="10.0.0.7"))
    assert ("first", "hybrid") in pipe.conversations
    service.warm(added, [], settings("auto", GREEDY), session("second", host="10.0.0.7"))
    assert ("second", "hybrid") not in pipe.conversations, "the address has used its one request a minute"
