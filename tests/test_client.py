"""The launched app on localhost, driven through its named endpoints by `gradio_client` and plain
HTTP: answers, many users at once, and what a public link must never give away."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from app import RATE_LIMIT, parse_args
from hybrid.launch import describe
from hybrid.limits import RateLimiter
from tests.helpers import free_port
from web.admission import Admission
from web.page import EXAMPLES, EXAMPLES_DIR, MAX_FILE_SIZE, build_demo, launch_demo

REPO = Path(__file__).resolve().parents[1]
QUEUE = 8  # smaller than the app's default, so that 16 requests at once overflow it


@pytest.fixture(scope="module")
def url(pipeline):
    loaded = pipeline("base")
    demo = build_demo(loaded, describe(loaded), admission=Admission(RateLimiter(RATE_LIMIT, 60.0)))
    launch_demo(demo, QUEUE, server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        yield demo.local_url.rstrip("/")
    finally:
        demo.close()


@pytest.fixture(scope="module")
def client(url):
    return Client(url, verbose=False)


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


@pytest.mark.slow  # sixteen clients, the slowest route
def test_sixteen_users_at_once_are_answered_or_told_the_queue_is_full(url):
    outcomes: list[str] = []
    ready = threading.Barrier(16)  # every user connected first, then all ask at the same moment

    def user() -> None:
        try:
            client = Client(url, verbose=False)
            ready.wait(timeout=120)
            # the PyTorch reference: the slowest route, so the first answers do not empty the queue
            _, results = client.predict("Hello!", None, "pytorch", 32, 0.0, 0, api_name="/generate")
            outcomes.append(results[0]["finish_reason"])
        except Exception as exc:  # noqa: BLE001 (every outcome is recorded and checked below)
            outcomes.append(f"{type(exc).__name__}: {exc}")

    users = [threading.Thread(target=user) for _ in range(16)]
    for thread in users:
        thread.start()
    for thread in users:
        thread.join(timeout=300)
    assert len(outcomes) == 16
    answered = [o for o in outcomes if o in ("eos", "length")]
    refused = [o for o in outcomes if o not in answered]
    assert answered and all("Queue is full" in o for o in refused), outcomes
    assert refused, "with a queue of 8, some of 16 simultaneous requests must be refused"
    _, results = Client(url, verbose=False).predict("Hi!", None, "auto", 4, 0.0, 0, api_name="/generate")
    assert results[0]["timings"]["decode_tokens"] > 0


@pytest.mark.parametrize("secret", [REPO / "app.py", REPO / "assets/demo-model/config.json", Path("/etc/passwd")])
def test_only_uploads_and_example_pictures_are_served(url, secret):
    assert httpx.get(f"{url}/gradio_api/file={EXAMPLES_DIR / EXAMPLES[0][0]}").status_code == 200
    refused = httpx.get(f"{url}/gradio_api/file={secret}")
    assert refused.status_code == 403 and refused.content.startswith(b'{"detail"')


def test_a_server_path_cannot_be_passed_as_an_image(url):
    payload = {"path": str(REPO / "app.py"), "meta": {"_type": "gradio.FileData"}}
    event = httpx.post(f"{url}/gradio_api/call/generate", json={"data": ["Hi", payload, "auto", 4, 0.0, 0]})
    stream = httpx.get(f"{url}/gradio_api/call/generate/{event.json()['event_id']}", timeout=60).text
    assert "event: error" in stream and "import" not in stream


def test_uploads_over_the_size_limit_are_refused(url):
    limit = int(MAX_FILE_SIZE.removesuffix("mb")) * 2**20
    big = httpx.post(f"{url}/gradio_api/upload", files={"files": ("big.png", b"\0" * (limit + 1), "image/png")})
    assert big.status_code == 413 and "maximum allowed size" in big.text


def test_login_is_required_when_auth_is_set(pipeline):
    loaded = pipeline("base")
    demo = build_demo(loaded, describe(loaded))
    port = free_port()
    launch_demo(
        demo, server_name="127.0.0.1", server_port=port, auth=("ada", "s3cret"), prevent_thread_lock=True, quiet=True
    )
    try:
        with pytest.raises(Exception, match="(?i)login|auth|401|403"):
            Client(demo.local_url, verbose=False)
        _, results = Client(demo.local_url, auth=("ada", "s3cret"), verbose=False).predict(
            "Hello!", None, "genai", 4, 0.0, 0, api_name="/generate"
        )
        assert results[0]["route"] == "genai"
    finally:
        demo.close()


def test_auth_comes_from_the_flag_or_the_environment(monkeypatch):
    monkeypatch.delenv("HYBRID_AUTH", raising=False)
    assert parse_args([]).auth is None
    assert parse_args(["--auth", "ada:pw"]).auth == "ada:pw"
    monkeypatch.setenv("HYBRID_AUTH", "bob:pw2")
    assert parse_args([]).auth == "bob:pw2"
    for bad in ("nocolon", ":pw", "user:"):
        with pytest.raises(SystemExit):
            parse_args(["--auth", bad])
