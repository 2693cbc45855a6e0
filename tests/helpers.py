"""Shared test helpers: run a route greedily, and compute teacher-forced reference logits."""

from __future__ import annotations

import socket

import numpy as np
import torch

from hybrid.config import SamplingConfig
from hybrid.metrics import Stopwatch
from hybrid.speculative import Draft, DraftPolicy
from hybrid.types import Message, Request, collect

NEW_TOKENS = 24


class VerifyAll(DraftPolicy):
    """A policy that verifies every draft, whatever it costs: tests of the verification itself use
    it (monkeypatched over `hybrid.routes.hybrid.DraftPolicy`), so that what they check does not
    hang on this machine's pass times or on what the route's earlier answers kept."""

    def choose(self, draft: Draft) -> int:
        return len(draft.tokens)


def ask(text: str, images=(), history=(), max_new_tokens: int = NEW_TOKENS, **sampling) -> Request:
    sampling.setdefault("min_new_tokens", max_new_tokens)  # random weights may emit EOS at once
    sampling_config = SamplingConfig(max_new_tokens=max_new_tokens, **sampling)
    return Request(tuple(history) + (Message("user", text, tuple(images)),), sampling_config)


def run(pipeline, request: Request, route: str) -> dict:
    return collect(route, pipeline.stream(request, route))


def reference_logits(model, inputs, generated: list[int]) -> np.ndarray:
    """HF logits `(n, V)` that predicted each generated token, teacher-forced in one forward."""
    ids = np.concatenate([inputs.input_ids, np.array([generated[:-1]], dtype=np.int64)], axis=1)
    types = np.concatenate([inputs.mm_token_type_ids, np.zeros((1, len(generated) - 1), dtype=np.int64)], axis=1)
    kwargs = dict(input_ids=torch.from_numpy(ids), mm_token_type_ids=torch.from_numpy(types))
    kwargs.update(inputs.vision_kwargs())
    with torch.inference_mode():
        logits = model(**kwargs).logits[0]
    return logits[inputs.num_tokens - 1 :].numpy()


def hybrid_logits(route, inputs, generated: list[int]) -> np.ndarray:
    """The route's own logits `(n, V)` for the same tokens: its prefill, then its step per token."""
    cache = route.decoder.new_cache(inputs.num_tokens + len(generated))
    logits, delta = route.prefill(cache, inputs, 0, Stopwatch())
    rows = [logits]
    for token in generated[:-1]:
        rows.append(route.feed(cache, [token], delta)[0].copy())
    return np.stack(rows)


def genai_logits(route, inputs, generated: list[int]) -> np.ndarray:
    """The GenAI route's logits `(n, V)` for the same tokens, fed one by one after the prompt."""
    og = route.og
    params = og.GeneratorParams(route.model)
    params.set_search_options(max_length=inputs.num_tokens + len(generated))
    generator = og.Generator(route.model, params)
    generator.append_tokens(inputs.input_ids[0].tolist())
    rows = [np.asarray(generator.get_logits()).reshape(-1)]
    for token in generated[:-1]:
        generator.append_tokens([token])
        rows.append(np.asarray(generator.get_logits()).reshape(-1))
    return np.stack(rows)


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
