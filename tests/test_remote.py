"""The remote route against a second instance of the app in another process, over real HTTP on
localhost: it answers as the local route of the same bundle does, stands beside the local routes in
Compare all, and a server that cannot be reached, breaks its stream or goes down mid-answer is an
unavailable route or a clear error while the other routes keep serving."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from hybrid.errors import RouteError
from hybrid.launch import describe
from hybrid.pipeline import Pipeline
from hybrid.routes.remote import RemoteConfig
from tests.conftest import draw_scene
from tests.helpers import ask, free_port, run
from tests.page import chat_updates, last, make_service
from web.page import header

REPO = Path(__file__).resolve().parents[1]


def start_app(bundle: Path) -> tuple[subprocess.Popen, str]:
    """`python app.py --bundle BUNDLE` in its own process; returns it and its /v1 URL once it answers."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "app.py", "--bundle", str(bundle), "--port", str(port), "--rate-limit", "0"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.5)
        if process.poll() is not None:
            break
    process.kill()
    raise RuntimeError("the second app did not start")


@pytest.fixture(scope="module")
def other_app(bundle):
    process, url = start_app(bundle("base"))
    try:
        yield url
    finally:
        process.kill()
        process.wait(30)


@pytest.fixture(scope="module")
def with_remote(bundle, other_app):
    return Pipeline.load(bundle("base"), only=("hybrid", "genai"), remote=RemoteConfig(other_app, "hybrid"))


def test_the_remote_route_answers_as_the_same_bundles_local_route(with_remote):
    picture = draw_scene((96, 80), (200, 40, 40))
    request = ask("What is in the picture?", (picture,), max_new_tokens=12)
    remote, local = run(with_remote, request, "remote"), run(with_remote, request, "hybrid")
    assert remote["text"] == local["text"] and remote["text"], "greedy: the same bundle gives the same answer"
    timings = remote["timings"]
    assert (
        timings["decode_tokens"] == len(local["token_ids"])
        and timings["prompt_tokens"] == local["timings"]["prompt_tokens"]
    )
    assert timings["ttft_ms"] > 0 and timings["total_ms"] >= timings["ttft_ms"]


def test_compare_all_shows_the_remote_beside_the_local_routes(with_remote):
    service = make_service(with_remote)
    updates = chat_updates(
        service, {"text": "Hello!", "files": []}, route="compare", sampling=(8.0, 0.0, 1.0, 0.0, 1.0, 0.0)
    )
    assert last(updates, "latency")["route"].tolist() == ["hybrid", "genai", "remote"]
    assert f"**Remote server**: hybrid at {with_remote.routes['remote'].base}" in header(describe(with_remote))
    texts = [t.text for t in last(updates, "turns") if t.role == "assistant"]
    assert len(set(texts)) == 1, texts


def test_the_cli_generates_through_the_remote_and_says_how_to_give_one(bundle, other_app):
    command = [sys.executable, "-m", "hybrid", "generate", "--bundle", str(bundle("base")), "--prompt", "Hello!"]
    command += ["--route", "remote", "--max-new-tokens", "6", "--json"]
    served = subprocess.run([*command, "--remote", other_app], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert served.returncode == 0, served.stderr
    result = json.loads(served.stdout)
    assert result["route"] == "remote" and result["timings"]["decode_tokens"] > 0
    refused = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "start with --remote URL" in refused.stderr, refused.stderr


def test_a_server_that_cannot_be_reached_leaves_the_route_unavailable(bundle):
    closed = f"http://127.0.0.1:{free_port()}/v1"
    loaded = Pipeline.load(bundle("base"), only=("genai",), remote=RemoteConfig(closed, connect_timeout_s=1.0))
    assert "cannot reach" in loaded.unavailable["remote"] and "genai" in loaded.routes
    with pytest.raises(RouteError, match="unavailable"):
        list(loaded.stream(ask("Hello!"), "remote"))


class Broken(http.server.BaseHTTPRequestHandler):
    """A server whose model list is fine and whose answer stream is not JSON."""

    def do_GET(self):
        self._send(b'{"object": "list", "data": [{"id": "m"}]}', "application/json")

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self._send(b'data: {"choices": [{"delta": {"content": "Hi"}}]}\n\ndata: {not json\n\n', "text/event-stream")

    def _send(self, body: bytes, kind: str):
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_malformed_stream_ends_in_a_clear_error(bundle):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Broken)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        loaded = Pipeline.load(
            bundle("base"), only=("genai",), remote=RemoteConfig(f"http://127.0.0.1:{server.server_port}/v1")
        )
        chunks = loaded.stream(ask("Hello!"), "remote")
        assert next(chunks).text == "Hi"
        with pytest.raises(RouteError, match="malformed"):
            list(chunks)
    finally:
        server.shutdown()


def test_the_remote_going_down_mid_answer_is_an_error_and_the_rest_serves(bundle):
    process, url = start_app(bundle("base"))
    try:
        loaded = Pipeline.load(bundle("base"), only=("genai",), remote=RemoteConfig(url, "hybrid"))
        chunks = loaded.stream(ask("Describe everything you know.", max_new_tokens=400), "remote")
        next(chunks)
        process.kill()
        with pytest.raises(RouteError, match="remote"):
            list(chunks)
        assert run(loaded, ask("Hello!", max_new_tokens=4), "genai")["text"] is not None
    finally:
        process.kill()
        process.wait(30)
