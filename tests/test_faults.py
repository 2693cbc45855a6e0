"""Faults: a failing route, cancellation, corrupted bundles, and memory over many requests."""

from __future__ import annotations

import gc
import json
import shutil
import threading
import weakref
from types import SimpleNamespace

import pytest

from hybrid.errors import BundleError, RouteError
from hybrid.export.bundle import export_bundle
from hybrid.manifest import MANIFEST_NAME
from hybrid.metrics import rss_mb
from hybrid.pipeline import Pipeline
from tests.conftest import draw_scene
from tests.helpers import ask, run


def test_a_failing_route_gives_a_clear_error_and_the_others_keep_serving(pipeline, monkeypatch):
    pipe = pipeline("base")
    decoder = pipe.routes["hybrid"].decoder

    def broken(*args, **kwargs):
        raise RuntimeError("simulated fault")

    monkeypatch.setattr(decoder, "forward", broken)
    with pytest.raises(RouteError, match="the hybrid route failed: RuntimeError: simulated fault"):
        run(pipe, ask("Hello!"), "hybrid")
    assert len(run(pipe, ask("Hello!"), "genai")["token_ids"]) > 0
    monkeypatch.undo()
    assert len(run(pipe, ask("Hello!"), "hybrid")["token_ids"]) > 0


@pytest.mark.parametrize("route", ["hybrid", "genai", "pytorch"])
def test_cancel_mid_stream_ends_early_and_the_next_request_works(pipeline, route):
    pipe = pipeline("base")
    cancel = threading.Event()
    chunks = []
    for chunk in pipe.stream(ask("Tell me everything.", max_new_tokens=200, min_new_tokens=200), route, cancel):
        chunks.append(chunk)
        if len(chunks) == 3:
            cancel.set()
    assert chunks[-1].finish_reason == "cancelled"
    assert sum(len(c.token_ids) for c in chunks) < 10
    assert run(pipe, ask("Hello!", max_new_tokens=5), route)["finish_reason"] == "length"


@pytest.mark.parametrize("route", ["hybrid", "genai"])
def test_cancel_frees_the_requests_cache_and_generator(pipeline, route, monkeypatch):
    """Once a cancelled stream is closed, its KV cache (hybrid) or Generator (GenAI) is gone."""
    pipe = pipeline("base")
    made: list[weakref.ref] = []
    if route == "hybrid":
        decoder = pipe.routes["hybrid"].decoder
        new_cache = decoder.new_cache
        monkeypatch.setattr(decoder, "new_cache", lambda n: _tracked(made, new_cache(n)))
    else:
        genai = pipe.routes["genai"]

        class Tracked(genai.og.Generator):
            def __init__(self, *args) -> None:
                super().__init__(*args)
                made.append(weakref.ref(self))

        monkeypatch.setattr(genai, "og", SimpleNamespace(Generator=Tracked, GeneratorParams=genai.og.GeneratorParams))
    cancel = threading.Event()
    stream = pipe.stream(ask("Tell me everything.", max_new_tokens=200, min_new_tokens=200), route, cancel)
    for i, chunk in enumerate(stream):  # noqa: B007 (the last chunk is checked after the loop)
        if i == 2:
            cancel.set()
    assert chunk.finish_reason == "cancelled"
    stream.close()
    gc.collect()
    assert len(made) == 1 and made[0]() is None


def _tracked(made: list, obj):
    made.append(weakref.ref(obj))
    return obj


@pytest.mark.slow
def test_memory_does_not_grow_over_many_requests(pipeline):
    pipe = pipeline("base")
    request = ask("What is this?", [draw_scene((96, 96), (200, 30, 30))], max_new_tokens=8)
    for _ in range(10):
        run(pipe, request, "hybrid")
        run(pipe, ask("Hi!", max_new_tokens=8), "genai")
    after_10 = rss_mb()
    for _ in range(90):
        run(pipe, request, "hybrid")
        run(pipe, ask("Hi!", max_new_tokens=8), "genai")
    assert rss_mb() <= after_10 * 1.10


def _copy(bundle, tmp_path):
    target = tmp_path / "bundle"
    shutil.copytree(bundle, target)
    return target


def test_missing_file_is_named_and_only_its_route_is_missing(bundle, tmp_path):
    target = _copy(bundle("base"), tmp_path)
    (target / "decoder" / "model.onnx").unlink()
    pipe = Pipeline.load(target)
    assert set(pipe.routes) == {"genai", "pytorch"}
    with pytest.raises(RouteError, match="the hybrid route is unavailable: .*decoder/model.onnx is missing"):
        pipe.plan(ask("What is this?", [draw_scene((64, 64), (200, 30, 30))]), "auto")


def test_corrupted_file_is_named(bundle, tmp_path):
    target = _copy(bundle("base"), tmp_path)
    path = target / "vision" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert "vision/model.safetensors is corrupted" in Pipeline.load(target).unavailable["hybrid"]
    (target / "processor" / "tokenizer.json").write_text("{}")  # shared by every route: nothing can serve
    with pytest.raises(BundleError, match="processor/tokenizer.json is corrupted"):
        Pipeline.load(target)


def test_incompatible_or_broken_manifest(bundle, tmp_path):
    target = _copy(bundle("base"), tmp_path)
    manifest = json.loads((target / MANIFEST_NAME).read_text())
    (target / MANIFEST_NAME).write_text(json.dumps({**manifest, "format": 99}))
    with pytest.raises(BundleError, match="bundle format 99"):
        Pipeline.load(target)
    (target / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(BundleError, match="manifest.json is corrupted"):
        Pipeline.load(target)


def test_export_crash_leaves_no_half_bundle(checkpoint, tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash mid-export")

    monkeypatch.setattr("hybrid.export.decoder.export_decoder", crash)
    with pytest.raises(RuntimeError):
        export_bundle(str(checkpoint("base")), tmp_path / "out", "fp32", genai=False)
    assert list(tmp_path.iterdir()) == []
