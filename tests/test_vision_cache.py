"""A follow-up question about the same picture skips the vision tower and answers the same."""

from __future__ import annotations

from hybrid.types import Message
from tests.conftest import draw_scene
from tests.helpers import ask, run


def test_follow_up_hits_the_feature_cache(pipeline):
    pipe = pipeline("base")
    tower = pipe.routes["hybrid"].vision
    image = draw_scene((80, 112), (10, 180, 90))
    first = run(pipe, ask("What is this?", [image]), "hybrid")
    hits, processed = tower.cache.hits, pipe.processor.pictures.hits
    history = (Message("user", "What is this?", (image,)), Message("assistant", first["text"]))
    follow_up = ask("Where is it?", history=history)
    cached = run(pipe, follow_up, "hybrid")
    assert tower.cache.hits == hits + 1
    assert pipe.processor.pictures.hits == processed + 1  # not processed again either
    assert cached["timings"]["vision_ms"] < 5
    tower.cache.entries.clear()
    assert run(pipe, follow_up, "hybrid")["token_ids"] == cached["token_ids"]
    assert cached["token_ids"] == run(pipe, follow_up, "pytorch")["token_ids"]
