"""The launched app on localhost, driven through its named endpoints by `gradio_client`."""

from __future__ import annotations

import socket

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from app import EXAMPLES, EXAMPLES_DIR, build_demo, launch_demo
from hybrid.launch import describe_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def client(pipeline):
    loaded = pipeline("base")
    demo = build_demo(loaded, describe_model(loaded.manifest))
    launch_demo(demo, server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        yield Client(demo.local_url, verbose=False)
    finally:
        demo.close()


def test_generate_answers_an_image_prompt(client):
    image = handle_file(str(EXAMPLES_DIR / EXAMPLES[0][0]))
    text, results = client.predict("What shape is this?", image, "auto", 16, 0.0, 0, api_name="/generate")
    assert isinstance(text, str) and text == results[0]["text"]
    assert results[0]["route"] == "hybrid"
    assert results[0]["finish_reason"] in ("eos", "length")
    timings = results[0]["timings"]
    assert timings["vision_ms"] > 0 and timings["decode_tokens"] == len(results[0]["token_ids"]) > 0


def test_generate_compares_routes_on_a_text_prompt(client):
    text, results = client.predict("Hello!", None, "compare", 8, 0.0, 0, api_name="/generate")
    assert [r["route"] for r in results] == ["pytorch", "hybrid", "genai"]
    assert len({r["text"] for r in results}) == 1 and text == results[0]["text"]


def test_a_bad_request_is_reported_and_the_app_keeps_serving(client):
    with pytest.raises(AppError, match="temperature"):
        client.predict("Hello!", None, "auto", 8, -1.0, 0, api_name="/generate")
    text, results = client.predict("Hello!", None, "genai", 8, 0.0, 0, api_name="/generate")
    assert results[0]["route"] == "genai" and results[0]["timings"]["total_ms"] > 0
