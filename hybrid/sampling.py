"""Token selection from one row of logits, in numpy, with the RNG passed in.

Order as in transformers: repetition penalty, temperature, top-k, top-p, then a draw.
Temperature 0 is argmax (after the repetition penalty). `sample_against_draft` is the same choice
where a draft guessed the token (`hybrid.speculative`).
"""

from __future__ import annotations

import numpy as np

from hybrid.config import SamplingConfig


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL-style: divide positive and multiply negative logits of already seen tokens."""
    if penalty == 1.0 or seen.size == 0:
        return logits
    logits = logits.copy()
    picked = logits[seen]
    logits[seen] = np.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def suppress(logits: np.ndarray, token_ids: tuple[int, ...]) -> np.ndarray:
    """Make `token_ids` impossible (EOS before `min_new_tokens`)."""
    logits = logits.copy()
    logits[list(token_ids)] = -np.inf
    return logits


def logits_to_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    logits = logits.astype(np.float64) / temperature
    if 0 < top_k < logits.size:
        kth = np.partition(logits, -top_k)[-top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        keep = cumulative - probs[order] < top_p
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return probs


def sample(logits: np.ndarray, config: SamplingConfig, seen: np.ndarray, rng: np.random.Generator) -> int:
    """Pick the next token id from `logits` `(V,)`; `seen` holds the ids already in the sequence."""
    logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
    if config.greedy:
        return int(np.argmax(logits))
    probs = logits_to_probs(logits, config.temperature, config.top_k, config.top_p)
    return int(rng.choice(probs.size, p=probs))


def sample_against_draft(
    logits: np.ndarray, config: SamplingConfig, seen: np.ndarray, rng: np.random.Generator, draft: int
) -> int:
    """Pick the next token from `logits` as `sample` would, where a cheaper guess drafted `draft`:
    speculative sampling with the draft as a point mass. Greedy: the argmax (the draft is kept when
    it is the argmax). Sampling: `draft` with probability p(draft), else a draw from p without it,
    which picks each token with probability p: the plain loop's distribution, exactly."""
    logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
    if config.greedy:
        return int(np.argmax(logits))
    probs = logits_to_probs(logits, config.temperature, config.top_k, config.top_p)
    if rng.random() < probs[draft]:
        return draft
    probs[draft] = 0.0  # p(draft) < 1 here, so the rest has mass
    return int(rng.choice(probs.size, p=probs / probs.sum()))
