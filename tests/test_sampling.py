"""Sampling: greedy is argmax, seeds reproduce, top-k/top-p restrict the support, penalties apply."""

from __future__ import annotations

import numpy as np
import pytest

from hybrid.config import SamplingConfig
from hybrid.errors import UserError
from hybrid.sampling import apply_repetition_penalty, logits_to_probs, sample

LOGITS = np.array([2.0, 1.0, 0.5, 0.0, -1.0, 3.0], dtype=np.float32)
NONE = np.array([], dtype=np.int64)


def draws(config: SamplingConfig, n: int = 400) -> list[int]:
    rng = np.random.default_rng(config.seed)
    return [sample(LOGITS, config, NONE, rng) for _ in range(n)]


def test_greedy_is_argmax():
    assert sample(LOGITS, SamplingConfig(), NONE, np.random.default_rng(0)) == 5


def test_seed_reproduces_and_differs():
    config = SamplingConfig(temperature=1.0, seed=7)
    assert draws(config) == draws(config)
    assert draws(config) != draws(SamplingConfig(temperature=1.0, seed=8))


def test_top_k_restricts_support():
    assert set(draws(SamplingConfig(temperature=1.5, top_k=2))) == {0, 5}


def test_top_p_restricts_support():
    probs = logits_to_probs(LOGITS, 1.0, 0, 0.7)
    assert set(np.flatnonzero(probs)) == {0, 5}  # 0.61 + 0.22 reaches 0.7
    assert probs.sum() == pytest.approx(1.0)
    assert set(draws(SamplingConfig(temperature=1.0, top_p=0.7))) == {0, 5}


def test_repetition_penalty_lowers_seen_tokens():
    penalised = apply_repetition_penalty(LOGITS, np.array([5, 4]), 2.0)
    assert penalised[5] == 1.5 and penalised[4] == -2.0 and penalised[0] == 2.0
    assert sample(LOGITS, SamplingConfig(repetition_penalty=2.0), np.array([5]), np.random.default_rng(0)) == 0


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=-0.1),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_k=-1),
        dict(max_new_tokens=0),
        dict(seed=1.5),
        dict(temperature=float("nan")),
        dict(repetition_penalty=0),
    ],
)
def test_out_of_range_values_are_refused(bad):
    with pytest.raises(UserError):
        SamplingConfig(**bad)
