"""Speculative decoding (prompt-lookup drafts, one verifying pass) is exact: greedy tokens equal the
plain loop's with pictures, videos, follow-ups and on the demo model, and sampled tokens keep the plain
loop's distribution. The drafter and the adaptive draft length do what they say."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from hybrid.__main__ import main
from hybrid.config import SamplingConfig
from hybrid.demo import scenes
from hybrid.pipeline import Pipeline
from hybrid.routes import hybrid as hybrid_route
from hybrid.sampling import apply_repetition_penalty, logits_to_probs, sample_against_draft
from hybrid.speculative import (
    GUESSED_SLOPE,
    NO_DRAFT,
    PRIOR_WEIGHT,
    Acceptance,
    Draft,
    DraftPolicy,
    NgramDrafter,
    PassCosts,
)
from hybrid.types import Message
from tests.conftest import draw_scene, write_video
from tests.helpers import VerifyAll, ask, run

RED = draw_scene((96, 96), (200, 30, 30))


def both(pipe, request, route: str = "hybrid") -> tuple[dict, dict]:
    """The answer with speculation, and without."""
    on = run(pipe, replace(request, sampling=replace(request.sampling, speculative="ngram")), route)
    off = run(pipe, replace(request, sampling=replace(request.sampling, speculative="off")), route)
    return on, off


# ---- the drafter and the draft length ----------------------------------------------------------


def test_the_drafter_proposes_what_followed_the_longest_suffix_seen_before():
    drafter = NgramDrafter([5, 6, 7, 8, 9, 1, 6, 7, 2, 3])
    assert drafter.propose(4) == NO_DRAFT  # 3 never occurred before
    drafter.push(6)
    assert drafter.propose(4) == Draft([7, 2, 3, 6], 1)  # the latest 6 (one token of suffix)
    drafter.push(7)
    assert drafter.propose(3) == Draft([2, 3, 6], 2)  # "6 7" last came before 2
    drafter.extend([8])
    assert drafter.propose(5) == Draft([9, 1, 6, 7, 2], 3)  # "6 7 8" occurred only at the start
    assert drafter.propose(0) == drafter.propose(-1) == NO_DRAFT


def timed_policy(pass_ms: dict[int, float]) -> DraftPolicy:
    """A policy over passes timed at these sizes (twice each: a size's first pass is not counted)."""
    costs = PassCosts()
    for size, ms in pass_ms.items():
        costs.time(size, 1.0)
        costs.time(size, ms / 1e3)
    return DraftPolicy(costs)


def test_the_policy_verifies_what_pays_for_its_pass():
    draft = Draft(list(range(8)), 3)
    cheap = timed_policy({1: 1.0, 9: 1.2})  # a small model: the pass costs its overhead
    for _ in range(4):
        cheap.observe(3, 8, 8)
    assert cheap.choose(draft) == 8
    assert 0.8 < cheap.acceptance(3) < 1.0 and cheap.acceptance(1) == 0.5
    costly = timed_policy({1: 1.0, 2: 1.6, 9: 4.0})  # each drafted token costs 60% of a step
    assert costly.choose(draft) == 0  # at the prior's 0.5 a draft pays 0.5 for 0.6
    for _ in range(30):
        costly.observe(3, 1, 1)
    assert costly.choose(draft) >= 1
    middling = timed_policy({1: 1.0, 9: 2.0})  # each drafted token costs 12.5% of a step
    assert middling.choose(draft) > 0
    for _ in range(30):  # drafts that are never right stop being verified...
        middling.observe(1, 1, 0)
    assert middling.choose(Draft([1, 2], 1)) == 0
    declined = 0
    while middling.choose(Draft([1, 2], 1)) == 0:  # ...until the evidence has faded
        declined += 1
    assert 10 < declined < 200


def test_each_answer_starts_from_what_the_routes_recent_answers_kept():
    seen = Acceptance()
    first = DraftPolicy(PassCosts(), seen)
    assert first.acceptance(2) == 0.5
    for _ in range(50):
        first.observe(2, 4, 0)  # this model's 2-token matches are never right
    fresh = DraftPolicy(PassCosts(), seen)
    assert fresh.acceptance(2) == pytest.approx(1 / (2 + PRIOR_WEIGHT)) and fresh.acceptance(3) == 0.5
    for _ in range(8):  # worth no more than a few passes: the answer's own evidence soon counts as much
        fresh.observe(2, 1, 1)
    assert fresh.acceptance(2) > 0.4


def test_a_pass_of_an_untimed_size_is_guessed_from_the_widest_timed_one():
    costs = timed_policy({1: 2.0, 5: 4.0}).costs
    assert costs.cost(5) == pytest.approx(2.0) and costs.cost(3) == pytest.approx(1.5)
    assert PassCosts().cost(11) == pytest.approx(1 + 10 * GUESSED_SLOPE)


# ---- sampling against a draft keeps the distribution --------------------------------------------


def critical_chi2(dof: int, z: float = 3.29) -> float:
    """The chi-square value above which a statistic of `dof` degrees of freedom has about 5e-4 of
    its mass (Wilson-Hilferty)."""
    return dof * (1 - 2 / (9 * dof) + z * np.sqrt(2 / (9 * dof))) ** 3


def two_sample_chi2(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    """Chi-square of two count vectors drawn from one distribution (cells empty in both dropped)."""
    keep = (a + b) > 0
    a, b = a[keep].astype(float), b[keep].astype(float)
    ka, kb = np.sqrt(b.sum() / a.sum()), np.sqrt(a.sum() / b.sum())
    return float(((ka * a - kb * b) ** 2 / (a + b)).sum()), int(keep.sum()) - 1


@pytest.mark.parametrize(
    "settings",
    [dict(temperature=1.0), dict(temperature=0.7, top_k=3), dict(temperature=1.3, top_p=0.8, repetition_penalty=1.3)],
)
def test_a_token_sampled_against_a_draft_has_the_plain_distribution(settings):
    logits = np.array([2.0, 1.5, 0.3, -1.0, 0.9, 0.0])
    config = SamplingConfig(**settings)
    seen = np.array([1, 4])
    rng = np.random.default_rng(0)
    penalised = apply_repetition_penalty(logits, seen, config.repetition_penalty)
    probs = logits_to_probs(penalised, config.temperature, config.top_k, config.top_p)
    n = 20_000
    for draft in (0, 1, 3):  # likely, second, and (with top-k/top-p) impossible drafts
        counts = np.bincount([sample_against_draft(logits, config, seen, rng, draft) for _ in range(n)], minlength=6)
        expected = probs * n
        assert counts[expected == 0].sum() == 0
        chi2 = float((((counts - expected) ** 2)[expected > 0] / expected[expected > 0]).sum())
        assert chi2 < critical_chi2(int((expected > 0).sum()) - 1), (draft, counts, expected.round())


def test_sampled_answers_keep_the_plain_loops_distribution(pipeline, monkeypatch):
    """Hundreds of short sampled answers with and without speculation: each position's tokens are
    drawn from the same distribution. Every pass drafts the greedy answer's next tokens (a draft that
    depends only on the position, as a draft must not depend on the draw), which are often but not
    always sampled: a sampler that kept drafts too often or too rarely would shift the counts."""
    pipe = pipeline("base")
    request = ask("Say red, red, red, red.", max_new_tokens=6, temperature=0.6, top_k=4)
    greedy = run(pipe, replace(request, sampling=replace(request.sampling, temperature=0.0)), "hybrid")
    oracle(monkeypatch, greedy["token_ids"], wrong_every=10**9)
    answers = {mode: [] for mode in ("ngram", "off")}
    kept = drafted = 0
    for seed in range(400):
        for mode in answers:
            answer = run(
                pipe, replace(request, sampling=replace(request.sampling, seed=seed, speculative=mode)), "hybrid"
            )
            answers[mode].append(answer["token_ids"])
            kept, drafted = kept + answer["timings"]["accepted_tokens"], drafted + answer["timings"]["draft_tokens"]
    assert 300 < kept < 0.8 * drafted, (kept, drafted)
    on, off = (np.array(answers[mode]) for mode in ("ngram", "off"))
    vocab = int(max(on.max(), off.max())) + 1
    for position in range(1, on.shape[1]):  # the first token is never drafted
        counts = [np.bincount(tokens[:, position], minlength=vocab) for tokens in (on, off)]
        chi2, dof = two_sample_chi2(*counts)
        assert chi2 < critical_chi2(dof), (position, counts)


# ---- greedy tokens equal the plain loop's -------------------------------------------------------


def oracle(monkeypatch, expected: list[int], wrong_every: int = 3) -> None:
    """The hybrid route drafts with `oracle_drafter(expected, wrong_every)` and verifies every draft."""
    monkeypatch.setattr(hybrid_route, "NgramDrafter", oracle_drafter(expected, wrong_every))
    monkeypatch.setattr(hybrid_route, "DraftPolicy", VerifyAll)


def oracle_drafter(expected: list[int], wrong_every: int = 3):
    """A drafter that proposes the plain loop's own next tokens, with the last one of every
    `wrong_every`-th proposal changed: each pass keeps some drafts and rejects one, whatever the
    weights (random ones rarely repeat themselves)."""

    class Oracle(NgramDrafter):
        def __init__(self, token_ids) -> None:
            super().__init__(token_ids)
            self.prompt, self.proposals = len(self.ids), 0

        def propose(self, most: int = 8) -> Draft:
            done = len(self.ids) - self.prompt  # generated tokens the sequence holds
            drafts = list(expected[done : done + max(most, 0)])
            self.proposals += 1
            if drafts and self.proposals % wrong_every == 0:
                drafts[-1] += 1
            return Draft(drafts, 3)

    return Oracle


@pytest.mark.parametrize("case", ["text", "one image", "two images, wide", "video"])
def test_greedy_tokens_equal_the_plain_loops(pipeline, tmp_path, monkeypatch, case):
    name = "wide" if case.endswith("wide") else "base"
    pipe = pipeline(name)
    images = {"text": (), "one image": (RED,), "two images, wide": (RED, draw_scene((64, 128), (30, 30, 200)))}
    request = ask("Repeat: the red circle, the red circle, the red circle.", images.get(case, ()), max_new_tokens=48)
    if case == "video":
        video = pipe.open_video(str(write_video(tmp_path / "clip.mp4")))
        request = replace(request, messages=(replace(request.messages[-1], videos=(video,)),))
    ngram, off = both(pipe, request)  # prompt lookup: what it finds in random weights' answers
    assert ngram["token_ids"] == off["token_ids"] and ngram["text"] == off["text"]
    assert off["timings"]["draft_tokens"] == 0  # (what ngram verifies depends on the route's history)
    oracle(monkeypatch, off["token_ids"])
    verified, _ = both(pipe, request)  # drafts kept and rejected at every stretch of the answer
    assert verified["token_ids"] == off["token_ids"] and verified["text"] == off["text"]
    timings = verified["timings"]
    assert timings["draft_tokens"] > timings["accepted_tokens"] > len(off["token_ids"]) // 2, timings


def test_a_follow_up_reuses_the_cache_that_verified_drafts(pipeline, monkeypatch):
    """Rejected drafts leave the kept cache: the follow-up, prefilled after the reused prefix, answers
    as a fresh conversation does, with speculation and without."""
    pipe = pipeline("base")
    first = replace(ask("Repeat: red, red, red.", (RED,), max_new_tokens=32), conversation_id="spec")
    plain = run(
        pipe, replace(first, conversation_id=None, sampling=replace(first.sampling, speculative="off")), "hybrid"
    )
    oracle(monkeypatch, plain["token_ids"])
    answer = run(pipe, first, "hybrid")
    monkeypatch.undo()
    assert answer["token_ids"] == plain["token_ids"]
    assert answer["timings"]["draft_tokens"] > answer["timings"]["accepted_tokens"] > 0  # some were cut
    history = (Message("user", "Repeat: red, red, red.", (RED,)), Message("assistant", answer["text"]))
    second = ask("And again?", history=history, max_new_tokens=32)
    reused = run(pipe, replace(second, conversation_id="spec"), "hybrid")
    assert reused["timings"]["reused_tokens"] > 0
    fresh = both(pipe, second)
    assert reused["token_ids"] == fresh[0]["token_ids"] == fresh[1]["token_ids"]


def test_stop_rules_end_a_verified_run_where_the_plain_loop_ends(pipeline):
    """max_new_tokens, stop strings and min_new_tokens cut inside a pass of drafts exactly as they cut
    the plain loop."""
    pipe = pipeline("base")
    plain = run(
        pipe,
        replace(
            ask("Repeat: red, red.", (RED,), max_new_tokens=40),
            sampling=SamplingConfig(max_new_tokens=40, min_new_tokens=40, speculative="off"),
        ),
        "hybrid",
    )
    text = plain["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    for sampling in (
        dict(max_new_tokens=13, min_new_tokens=13),
        dict(max_new_tokens=40, min_new_tokens=5, stop=(stop,)),
    ):
        request = replace(ask("Repeat: red, red.", (RED,)), sampling=SamplingConfig(**sampling))
        on, off = both(pipe, request)
        assert (
            on["token_ids"] == off["token_ids"]
            and on["text"] == off["text"]
            and on["finish_reason"] == off["finish_reason"]
        )


@pytest.mark.slow
def test_the_demo_model_answers_alike_and_its_grounding_drafts_are_often_right(demo_bundle, monkeypatch):
    """On the trained demo model, tokens equal the plain loop's whatever the policy verifies, and
    prompt lookup finds grounding answers' repeated JSON: verifying every draft, more than one
    token in ten comes out of a pass that verified it rather than a pass of its own."""
    pipe = Pipeline.load(demo_bundle("fp32"), verify=False, only=("hybrid",))
    rng = np.random.default_rng(99)
    requests = []
    for _ in range(4):
        scene = scenes.random_scene(rng, shapes=3)
        question = scenes.ask("locate_all", scene, rng).question
        requests.append(ask(question, (scene.render(),), max_new_tokens=96, min_new_tokens=0))
    plain = []
    for request in requests:  # the policy as shipped: it verifies what pays on this machine
        on, off = both(pipe, request)
        assert on["token_ids"] == off["token_ids"] and on["text"].startswith('[{"bbox_2d": [')
        plain.append(off["token_ids"])
    monkeypatch.setattr(hybrid_route, "DraftPolicy", VerifyAll)
    kept = generated = 0
    for request, expected in zip(requests, plain, strict=True):
        answer = both(pipe, request)[0]
        assert answer["token_ids"] == expected
        kept, generated = kept + answer["timings"]["accepted_tokens"], generated + len(expected)
    assert kept > 0.1 * generated, (kept, generated)


def test_the_cli_takes_the_setting_and_refuses_an_unknown_one(bundle, capsys):
    args = ["generate", "--bundle", str(bundle("base")), "--prompt", "Say red, red.", "--max-new-tokens", "12"]
    answers = {}
    for mode in ("off", "ngram"):
        assert main([*args, "--json", "--route", "hybrid", "--speculative", mode]) == 0
        answers[mode] = json.loads(capsys.readouterr().out)
    assert answers["off"]["token_ids"] == answers["ngram"]["token_ids"]
    assert answers["off"]["timings"]["draft_tokens"] == 0
    with pytest.raises(SystemExit) as refused:
        main([*args, "--speculative", "eagle"])
    assert refused.value.code == 2 and "invalid choice: 'eagle'" in capsys.readouterr().err
