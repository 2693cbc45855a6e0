"""The checkpoint's own sampling settings start the app's controls; greedy is one toggle away; a real
checkpoint is served on the fast path unless fp32 is asked for."""

from __future__ import annotations

import json
import shutil

import pytest

from hybrid.config import CheckpointSampling
from hybrid.errors import BundleError, UserError
from hybrid.launch import DEMO_MODEL, TINY_MODEL, auto_precision, describe
from hybrid.layout import PROCESSOR_DIR
from hybrid.pipeline import Pipeline
from tests.page import make_service, session, settings
from web.page import build_demo

QWEN3_VL_INSTRUCT = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.0}


def test_a_generation_config_becomes_sampling_settings():
    own = CheckpointSampling.from_generation_config(QWEN3_VL_INSTRUCT)
    assert (own.do_sample, own.temperature, own.top_p, own.top_k) == (True, 0.7, 0.8, 20)
    assert own.settings(greedy=False)["temperature"] == 0.7
    assert own.settings(greedy=True)["temperature"] == 0.0
    plain = CheckpointSampling.from_generation_config({"eos_token_id": 5})
    assert not plain.do_sample and (plain.temperature, plain.top_p, plain.top_k) == (
        1.0,
        1.0,
        50,
    )  # transformers' defaults
    with pytest.raises(UserError, match="top_p"):
        CheckpointSampling.from_generation_config({**QWEN3_VL_INSTRUCT, "top_p": 0.0})


def test_an_unusable_generation_config_is_a_bundle_error(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": -1}))
    with pytest.raises(BundleError, match="generation config"):
        CheckpointSampling.read(tmp_path)
    assert CheckpointSampling.read(tmp_path / "nowhere") == CheckpointSampling()  # none: greedy


@pytest.fixture(scope="module")
def sampling_pipeline(bundle, tmp_path_factory):
    """The base bundle with a Qwen3-VL Instruct generation config."""
    copy = tmp_path_factory.mktemp("sampling") / "bundle"
    shutil.copytree(bundle("base"), copy)
    (copy / PROCESSOR_DIR / "generation_config.json").write_text(json.dumps(QWEN3_VL_INSTRUCT))
    return Pipeline.load(copy, verify=False, only=("hybrid",))


def _control(demo, elem_id: str | None = None, label: str | None = None):
    found = [
        b
        for b in demo.blocks.values()
        if (elem_id and b.elem_id == elem_id) or (label and getattr(b, "label", None) == label)
    ]
    assert len(found) == 1
    return found[0]


def test_the_controls_start_from_the_checkpoint(sampling_pipeline, pipeline):
    demo = build_demo(sampling_pipeline, describe(sampling_pipeline))
    assert _control(demo, elem_id="greedy").value is False
    assert _control(demo, label="Temperature").value == 0.7
    assert _control(demo, label="Top-p").value == 0.8
    assert _control(demo, label="Top-k").value == 20
    assert (
        _control(build_demo(pipeline("base"), describe(pipeline("base"))), elem_id="greedy").value is True
    )  # no config: greedy


def test_greedy_overrides_the_temperature_for_every_route(sampling_pipeline):
    service = make_service(sampling_pipeline)
    asked = []
    prepare = service._prepare
    service._prepare = lambda message, turns, chosen, *rest: asked.append(chosen.sampling) or prepare(
        message, turns, chosen, *rest
    )
    for greedy in (True, False):
        chosen = settings("hybrid", (8.0, 0.7, 0.8, 20.0, 1.0, 3.0), "low", greedy)
        updates = service.chat({"text": "Hello!", "files": []}, [], chosen, [], session(f"g{greedy}"))
        list(updates)
    assert asked[0].greedy and asked[0].top_k == 20
    assert not asked[1].greedy and asked[1].temperature == 0.7


def test_a_real_checkpoint_is_served_int4_by_default():
    assert auto_precision(DEMO_MODEL) == "fp32" and auto_precision(TINY_MODEL) == "fp32"
    assert auto_precision("Qwen/Qwen3-VL-2B-Instruct") == "int4"
    assert auto_precision("/models/Qwen3-VL-4B-Instruct") == "int4"
