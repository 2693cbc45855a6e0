"""Incremental detokenization never splits a character and never shows a stop string."""

from __future__ import annotations

from hybrid.streaming import TextStream


def byte_decode(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


def test_multibyte_characters_are_never_split():
    text = "héllo 漢字 🙂!"
    stream = TextStream(byte_decode)
    pieces = [stream.push(b) for b in text.encode()] + [stream.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_is_cut_and_never_streamed():
    stream = TextStream(byte_decode, stop=("END",))
    out = []
    for b in b"abc ENDxyz":
        out.append(stream.push(b))
        if stream.stopped:
            break
    assert "".join(out) + stream.flush() == "abc "
    assert stream.stopped


def test_partial_stop_prefix_is_released_when_it_diverges():
    stream = TextStream(byte_decode, stop=("END",))
    out = [stream.push(b) for b in b"EN"]
    assert "".join(out) == ""  # could still become END
    out.append(stream.push(ord("d")))
    assert "".join(out) == "ENd" and not stream.stopped
