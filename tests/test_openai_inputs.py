"""More of what the API reads, through its routes on a bare ASGI app (no page): image detail as the
picture's token budget, a video as a data URL, a route that could not load as a 503 with the
reason, and the client address a rate limit counts, behind a proxy or not."""

from __future__ import annotations

import base64
import io
import shutil

import pytest
from PIL import Image
from starlette.applications import Starlette
from starlette.testclient import TestClient

from hybrid.config import IMAGE_DETAIL
from hybrid.pipeline import Pipeline
from tests.conftest import draw_scene, write_video
from web.admission import Admission
from web.api import ApiConfig, ChatApi
from web.openai_request import Context, read_call


def client_of(pipeline) -> TestClient:
    return TestClient(Starlette(routes=ChatApi(pipeline, Admission(), ApiConfig()).routes()))


def ask(client: TestClient, content, model: str = "hybrid") -> dict:
    body = {"model": model, "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": content}]}
    return client.post("/v1/chat/completions", json=body).json()


def picture_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize(
    "details, budget", [(["low"], 256), (["high"], 4096), (["auto"], 1024), (["low", "high"], 4096)]
)
def test_image_detail_sets_the_pictures_token_budget(details, budget):
    url = picture_url(draw_scene((64, 48), (200, 40, 40)))
    parts = [{"type": "image_url", "image_url": {"url": url, "detail": d}} for d in details]
    context = Context({"temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}, 10**6, None)
    call = read_call(
        {"model": "auto", "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "?"}]}]},
        context,
        None,
    )
    assert call.request.max_image_tokens == budget == IMAGE_DETAIL[{256: "low", 1024: "medium", 4096: "high"}[budget]]


def test_a_data_url_wrapped_in_lines_reads_as_the_same_picture():
    url = picture_url(draw_scene((64, 48), (200, 40, 40)))
    head, data = url.split(",", 1)
    wrapped = head + "," + "\r\n".join(data[i : i + 76] for i in range(0, len(data), 76))
    context = Context({"temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}, 10**6, None)
    pictures = [
        read_call(
            {"model": "auto", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": u}]}]},
            context,
            None,
        ).request.images[0]
        for u in (url, wrapped)
    ]
    assert "\n" in wrapped and pictures[0].tobytes() == pictures[1].tobytes()


def test_a_video_arrives_as_a_data_url(pipeline, tmp_path):
    clip = write_video(tmp_path / "clip.mp4")
    url = "data:video/mp4;base64," + base64.b64encode(clip.read_bytes()).decode()
    reply = ask(
        client_of(pipeline("base")),
        [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "What happens?"}],
    )
    assert reply["object"] == "chat.completion" and reply["timings"]["video_tokens"], reply
    broken = {
        "type": "video_url",
        "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(b"not a video").decode()},
    }
    refused = client_of(pipeline("base")).post(
        "/v1/chat/completions", json={"model": "hybrid", "messages": [{"role": "user", "content": [broken]}]}
    )
    assert refused.status_code == 400 and "messages[0].content[0]" in refused.json()["error"]["message"]


def test_a_route_that_could_not_load_is_a_503_with_the_reason(bundle, tmp_path):
    target = tmp_path / "bundle"
    shutil.copytree(bundle("base"), target)
    (target / "genai" / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    loaded = Pipeline.load(target, verify=False, only=("hybrid", "genai"))
    client = client_of(loaded)
    refused = client.post(
        "/v1/chat/completions", json={"model": "genai", "messages": [{"role": "user", "content": "Hi"}]}
    )
    assert refused.status_code == 503 and "genai is unavailable" in refused.json()["error"]["message"]
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["auto", "hybrid"]
    assert ask(client, "Hello!", model="auto")["model"] == "hybrid", "auto serves text on hybrid when GenAI is out"


@pytest.mark.parametrize("trust, expected", [(False, "10.0.0.9"), (True, "203.0.113.7")])
def test_the_client_address_is_the_peers_unless_a_proxy_is_trusted(trust, expected):
    headers = {"x-forwarded-for": "203.0.113.7, 10.0.0.1"}
    assert Admission(trust_proxy=trust).client("10.0.0.9", headers) == expected
    assert Admission(trust_proxy=trust).client("10.0.0.9", {}) == "10.0.0.9"
