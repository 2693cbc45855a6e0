"""The ONNX decoder writes each step's keys and values into the request's own buffers, in place."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from hybrid.decoder import OnnxDecoder
from hybrid.layout import DECODER_FILE
from hybrid.rope import decode_position


def filled(buffer: np.ndarray) -> list[bool]:
    """Which positions of a `(1, kv_heads, capacity, d)` buffer hold something."""
    return [bool(np.abs(buffer[0, :, t]).sum() > 0) for t in range(buffer.shape[2])]


def test_steps_write_into_the_cache_buffers_in_place(bundle):
    decoder = OnnxDecoder(bundle("base") / DECODER_FILE)
    cache = decoder.new_cache(capacity=8)
    buffers = list(cache.buffers)
    rng = np.random.default_rng(0)
    prompt = rng.standard_normal((1, 3, decoder.hidden_size), dtype=np.float32)
    positions = np.broadcast_to(np.arange(3)[None, None], (3, 1, 3)).copy()
    decoder.forward(cache, prompt, positions, np.zeros((decoder.num_deepstack, 1, 3, decoder.hidden_size), np.float32))
    assert all(filled(b) == [True] * 3 + [False] * 5 for b in cache.buffers)
    step = np.zeros((decoder.num_deepstack, 1, 1, decoder.hidden_size), np.float32)
    decoder.forward(cache, prompt[:, :1], decode_position(cache.length, 0), step)
    assert all(filled(b) == [True] * 4 + [False] * 4 for b in cache.buffers)
    assert all(a is b for a, b in zip(buffers, cache.buffers, strict=True))
    five = rng.standard_normal((1, 5, decoder.hidden_size), dtype=np.float32)
    with pytest.raises(ValueError, match="holds 8 tokens, 9 asked"):
        decoder.forward(cache, five, positions, np.zeros_like(step).repeat(5, axis=2))


def test_the_cache_only_feeds_fused_attention(bundle):
    """No Concat, Tile or Transpose ever reads the past: nothing copies the cache per step."""
    graph = onnx.load(str(bundle("base") / DECODER_FILE), load_external_data=False).graph
    past = {i.name for i in graph.input if i.name.startswith("past_key_values.")}
    readers = {node.op_type for node in graph.node for name in node.input if name in past}
    assert readers == {"GroupQueryAttention"}
    assert sum(node.op_type == "GroupQueryAttention" for node in graph.node) == len(past) // 2


def test_a_decode_step_allocates_no_inputs_and_matches_a_one_token_forward(bundle):
    """`step` rewrites the inputs it bound once and returns the logits where the decoder wrote
    them; its result equals a general `forward` of the same token."""
    decoder = OnnxDecoder(bundle("base") / DECODER_FILE)
    rng = np.random.default_rng(1)
    prompt = rng.standard_normal((1, 3, decoder.hidden_size), dtype=np.float32)
    positions = np.broadcast_to(np.arange(3)[None, None], (3, 1, 3)).copy()
    no_deepstack = np.zeros((decoder.num_deepstack, 1, 3, decoder.hidden_size), np.float32)
    token = rng.standard_normal(decoder.hidden_size, dtype=np.float32)
    stepped, forwarded = decoder.new_cache(capacity=8), decoder.new_cache(capacity=8)
    for cache in (stepped, forwarded):
        decoder.forward(cache, prompt, positions, no_deepstack)

    out = decoder.step(stepped, token, 3)
    one = stepped.steps[1]
    bound = {name: value.data_ptr() for name, value in one.values.items()}
    arrays = (one.embeds, one.positions, one.logits)
    assert np.shares_memory(out, one.logits)  # no copy of the logits
    first = out.copy()
    calls = _record_bindings(stepped.binding)
    decoder.step(stepped, token, 4)
    assert calls == ["attention_mask"]  # a second step binds nothing new but the mask's length
    assert stepped.steps[1] is one and all(a is b for a, b in zip(arrays, (one.embeds, one.positions, one.logits)))
    assert bound == {name: value.data_ptr() for name, value in one.values.items()}

    expected = decoder.forward(forwarded, token[None, None], decode_position(3, 0), no_deepstack[:, :, :1])
    np.testing.assert_allclose(first, expected, rtol=1e-5, atol=1e-5)


def test_a_pass_of_several_tokens_gives_the_logits_of_as_many_steps(bundle):
    """`run_text` of k + 1 tokens (a verifying pass) returns each position's logits, equal to k + 1
    steps', writes the same keys, and after a truncation the cache goes on as if it had stepped."""
    decoder = OnnxDecoder(bundle("base") / DECODER_FILE)
    rng = np.random.default_rng(2)
    prompt = rng.standard_normal((1, 3, decoder.hidden_size), dtype=np.float32)
    positions = np.broadcast_to(np.arange(3)[None, None], (3, 1, 3)).copy()
    no_deepstack = np.zeros((decoder.num_deepstack, 1, 3, decoder.hidden_size), np.float32)
    tokens = rng.standard_normal((4, decoder.hidden_size), dtype=np.float32)
    stepped, passed = decoder.new_cache(capacity=10), decoder.new_cache(capacity=10)
    for cache in (stepped, passed):
        decoder.forward(cache, prompt, positions, no_deepstack)
    steps = np.stack([decoder.step(stepped, row, 3 + i).copy() for i, row in enumerate(tokens)])
    rows = decoder.run_text(passed, tokens, 3)
    assert rows.shape == (4, decoder.vocab_size) and passed.length == stepped.length == 7
    np.testing.assert_allclose(rows, steps, rtol=1e-4, atol=1e-4)
    for a, b in zip(passed.buffers, stepped.buffers, strict=True):
        np.testing.assert_allclose(a[:, :, :7], b[:, :, :7], rtol=1e-5, atol=1e-5)

    passed.truncate(5)  # the last two tokens rejected: the next step overwrites their keys
    stepped_again = decoder.new_cache(capacity=10)
    decoder.forward(stepped_again, prompt, positions, no_deepstack)
    for i, row in enumerate(tokens[:2]):
        decoder.step(stepped_again, row, 3 + i)
    token = rng.standard_normal(decoder.hidden_size, dtype=np.float32)
    np.testing.assert_allclose(
        decoder.step(passed, token, 5), decoder.step(stepped_again, token, 5), rtol=1e-4, atol=1e-4
    )
    calls = _record_bindings(passed.binding)
    decoder.run_text(passed, tokens, 6)  # another size binds its own inputs and logits, once
    assert set(calls) == {*passed.steps[4].values, "logits", "attention_mask"} and calls[-1] == "attention_mask"


def _record_bindings(binding) -> list[str]:
    """The names bound on `binding` from now on."""
    calls: list[str] = []
    for method in ("bind_cpu_input", "bind_ortvalue_input", "bind_ortvalue_output"):
        original = getattr(binding, method)
        setattr(binding, method, lambda name, value, original=original: (calls.append(name), original(name, value)))
    return calls
