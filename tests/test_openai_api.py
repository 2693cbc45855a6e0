"""The OpenAI-compatible API on the app's own server, driven by the official `openai` client and
plain HTTP: the model list, pictures as data URLs, streaming equal to a whole answer, a follow-up
that reuses the kept cache and equals a fresh answer, and every refusal a 4xx in OpenAI's error
shape with the server still serving after it."""

from __future__ import annotations

import base64
import io
import threading
import time

import httpx
import openai
import pytest
from PIL import Image

from hybrid.launch import describe
from hybrid.limits import RateLimiter
from tests.helpers import free_port
from web.admission import Admission
from web.api import ApiConfig, ChatApi
from web.page import EXAMPLES, EXAMPLES_DIR, build_demo, launch_demo

KEY = "test-key"
GREEDY = {"temperature": 0.0, "max_tokens": 12}


def serve(pipeline, admission: Admission, config: ApiConfig) -> tuple:
    """The page and the API of `pipeline` on a free localhost port: (demo, base URL)."""
    demo = build_demo(pipeline, describe(pipeline), admission=admission)
    api = ChatApi(pipeline, admission, config)
    launch_demo(
        demo,
        routes=api.routes(),
        server_name="127.0.0.1",
        server_port=free_port(),
        prevent_thread_lock=True,
        quiet=True,
    )
    return demo, demo.local_url.rstrip("/")


@pytest.fixture(scope="module")
def served(pipeline):
    demo, url = serve(pipeline("base"), Admission(), ApiConfig(key=KEY))
    try:
        yield url
    finally:
        demo.close()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served}/v1", api_key=KEY, max_retries=0)


def data_url(path_or_image, kind: str = "JPEG") -> str:
    if isinstance(path_or_image, Image.Image):
        buffer = io.BytesIO()
        path_or_image.save(buffer, kind)
        data = buffer.getvalue()
    else:
        data = open(path_or_image, "rb").read()
    return f"data:image/{kind.lower()};base64,{base64.b64encode(data).decode()}"


def picture_message(text: str, url: str, detail: str = "auto") -> dict:
    return {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": url, "detail": detail}}, {"type": "text", "text": text}],
    }


EXAMPLE = str(EXAMPLES_DIR / EXAMPLES[0][0])


def test_the_model_list_names_auto_and_the_loaded_routes(client):
    assert [m.id for m in client.models.list().data] == ["auto", "hybrid", "genai", "pytorch"]


def test_a_picture_is_answered_by_the_hybrid_route_as_the_pipeline_answers_it(client, pipeline):
    reply = client.chat.completions.create(
        model="auto", messages=[picture_message("What shape is this?", data_url(EXAMPLE))], **GREEDY
    )
    assert reply.object == "chat.completion" and reply.model == "hybrid"
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > reply.usage.completion_tokens
    timings = reply.model_extra["timings"]
    assert timings["route"] == "hybrid" and timings["vision_ms"] > 0 and timings["image_tokens"]
    reference = client.chat.completions.create(
        model="pytorch", messages=[picture_message("What shape is this?", data_url(EXAMPLE))], **GREEDY
    )
    assert reference.choices[0].message.content == reply.choices[0].message.content, "greedy: the routes agree"


def test_speculation_is_a_setting_that_never_changes_the_answer(client):
    """`speculative` (an extension): drafted and kept tokens are reported in the timings."""
    messages = [picture_message("Locate every shape.", data_url(EXAMPLE))]
    replies = {
        mode: client.chat.completions.create(
            model="hybrid", messages=messages, extra_body={"speculative": mode}, **GREEDY
        )
        for mode in ("off", "ngram")
    }
    assert replies["off"].choices[0].message.content == replies["ngram"].choices[0].message.content
    assert replies["off"].model_extra["timings"]["draft_tokens"] == 0
    assert (
        replies["ngram"].model_extra["timings"]["draft_tokens"]
        >= replies["ngram"].model_extra["timings"]["accepted_tokens"]
    )


def test_streaming_gives_the_same_answer_as_a_whole_one(client):
    messages = [picture_message("Describe the image in one sentence.", data_url(EXAMPLE))]
    whole = client.chat.completions.create(model="hybrid", messages=messages, **GREEDY)
    chunks = list(
        client.chat.completions.create(
            model="hybrid", messages=messages, stream=True, stream_options={"include_usage": True}, **GREEDY
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and len([c for c in chunks if c.choices]) > 3
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_the_stream_ends_with_done(served):
    body = {"model": "genai", "messages": [{"role": "user", "content": "Hello!"}], "stream": True, **GREEDY}
    text = httpx.post(
        f"{served}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    ).text
    events = [line for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) > 3


def test_a_follow_up_reuses_the_kept_prefix_and_equals_a_fresh_answer(client, pipeline):
    first = [picture_message("What colour is the shape?", data_url(EXAMPLE))]
    answer = client.chat.completions.create(model="hybrid", messages=first, **GREEDY)
    follow = [
        *first,
        {"role": "assistant", "content": answer.choices[0].message.content},
        {"role": "user", "content": "And where is it?"},
    ]
    reused = client.chat.completions.create(model="hybrid", messages=follow, **GREEDY)
    assert reused.usage.prompt_tokens_details.cached_tokens > answer.usage.prompt_tokens // 2
    pipeline("base").forget("pool:api")  # nothing kept: the same request from scratch
    fresh = client.chat.completions.create(model="hybrid", messages=follow, **GREEDY)
    assert fresh.usage.prompt_tokens_details.cached_tokens == 0
    assert fresh.choices[0].message.content == reused.choices[0].message.content


def test_text_goes_to_genai_with_a_system_message(client):
    reply = client.chat.completions.create(
        model="genai",
        messages=[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello!"}],
        **GREEDY,
    )
    assert reply.model == "genai" and reply.usage.completion_tokens > 0


BAD = [
    ("bad base64", {"messages": [picture_message("Hi", "data:image/png;base64,@@@not-base64@@@")]}, 400, "base64"),
    (
        "not an image",
        {"messages": [picture_message("Hi", "data:image/png;base64," + base64.b64encode(b"hello").decode())]},
        400,
        "not a readable image",
    ),
    ("a file: URL", {"messages": [picture_message("Hi", "file:///etc/passwd")]}, 400, "not accepted"),
    ("a server URL", {"messages": [picture_message("Hi", "http://127.0.0.1:1/x.png")]}, 400, "data URLs only"),
    ("unknown model", {"model": "gpt-4o"}, 404, "no model"),
    ("n = 2", {"n": 2}, 400, "n is not supported"),
    ("negative max_tokens", {"max_tokens": -3}, 400, "max_new_tokens"),
    ("tools", {"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools is not supported"),
    ("unknown field", {"frobnicate": True}, 400, "frobnicate"),
    ("no messages", {"messages": []}, 400, "messages"),
    (
        "an oversized data URL",
        {"messages": [picture_message("Hi", "data:image/png;base64," + "A" * (28 * 2**20))]},
        413,
        "MB",
    ),
    ("temperature as text", {"temperature": "hot"}, 400, "temperature"),
    ("unknown speculative mode", {"speculative": "eagle"}, 400, "speculative must be one of ngram, off"),
    ("speculative as a number", {"speculative": 4}, 400, "speculative must be a string"),
]


@pytest.mark.parametrize("case, change, status, words", BAD, ids=[case for case, *_ in BAD])
def test_each_refused_input_is_a_4xx_in_the_error_shape_and_the_server_keeps_serving(
    served, case, change, status, words
):
    body = {"model": "auto", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 4, **change}
    refused = httpx.post(
        f"{served}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    )
    assert refused.status_code == status, refused.text
    error = refused.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and words in error["message"], error
    fine = {"model": "genai", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 4}
    assert (
        httpx.post(
            f"{served}/v1/chat/completions", json=fine, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
        ).status_code
        == 200
    )


def test_a_body_that_is_not_json_is_a_400(served):
    refused = httpx.post(f"{served}/v1/chat/completions", content=b"{nope", headers={"Authorization": f"Bearer {KEY}"})
    assert refused.status_code == 400 and "not JSON" in refused.json()["error"]["message"]


def test_a_body_nested_too_deeply_is_a_400_and_the_server_keeps_serving(served):
    nested = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
    refused = httpx.post(f"{served}/v1/chat/completions", content=nested, headers={"Authorization": f"Bearer {KEY}"})
    assert refused.status_code == 400 and "nested too deeply" in refused.json()["error"]["message"]
    assert httpx.get(f"{served}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens"])
def test_an_answer_longer_than_the_servers_limit_is_refused_naming_its_parameter(served, name):
    body = {"model": "auto", "messages": [{"role": "user", "content": "Hello!"}], name: 10**6}
    refused = httpx.post(f"{served}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    error = refused.json()["error"]
    assert refused.status_code == 400 and error["param"] == name, error
    assert error["message"] == f"{name} is 1000000, this server's limit is 1024"


def test_the_key_is_required(served):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        refused = httpx.get(f"{served}/v1/models", headers=headers)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{served}/v1", api_key="wrong", max_retries=0).models.list()


def test_a_shared_link_without_a_key_has_no_api(pipeline):
    demo, url = serve(
        pipeline("base"), Admission(), ApiConfig(enabled=False, off_reason="a public link without --api-key")
    )
    try:
        refused = httpx.get(f"{url}/v1/models")
        assert refused.status_code == 404 and "the API is off" in refused.json()["error"]["message"]
    finally:
        demo.close()


def test_the_page_and_the_api_share_one_rate_limit_per_client_address(pipeline):
    admission = Admission(RateLimiter(2, 60.0))
    demo, url = serve(pipeline("base"), admission, ApiConfig())
    try:
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        api.chat.completions.create(model="genai", messages=[{"role": "user", "content": "Hello!"}], max_tokens=2)
        admission.check("127.0.0.1")  # the page's request from the same address
        with pytest.raises(openai.RateLimitError) as limited:
            api.chat.completions.create(model="genai", messages=[{"role": "user", "content": "Hello!"}], max_tokens=2)
        assert int(limited.value.response.headers["retry-after"]) >= 1
        assert "too many requests" in limited.value.response.json()["error"]["message"]
    finally:
        demo.close()


def test_a_full_queue_is_a_429_and_the_cpu_is_shared(pipeline):
    admission = Admission(max_waiting=1, wait_s=30.0)
    demo, url = serve(pipeline("base"), admission, ApiConfig())
    body = {"model": "genai", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 2}
    try:
        with admission.cpu():  # a page request on the CPU
            waiting = threading.Thread(
                target=httpx.post, args=(f"{url}/v1/chat/completions",), kwargs={"json": body, "timeout": 60}
            )
            waiting.start()
            deadline = time.monotonic() + 10
            while admission.refusal() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            full = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
            assert full.status_code == 429 and "busy" in full.json()["error"]["message"], full.text
            assert "retry-after" in full.headers
        waiting.join(60)
        assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code == 200
    finally:
        demo.close()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/x.png",
        "http://localhost:8080/x.png",
        "http://10.1.2.3/x.png",
        "https://192.168.0.7/x.png",
        "http://169.254.169.254/latest",
        "http://[::1]/x.png",
    ],
)
def test_url_pictures_are_never_fetched_from_local_or_private_addresses(url):
    """With --allow-url-images: refused on the resolved address, before any connection is made."""
    from web.openai_request import ApiError, Context, read_call

    context = Context(
        {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}, 10**6, None, allow_urls=True
    )
    body = {"model": "auto", "messages": [picture_message("Hi", url)]}
    with pytest.raises(ApiError, match="not a public address") as refused:
        read_call(body, context, None)
    assert refused.value.status == 400 and refused.value.body()["error"]["code"] == "url_not_allowed"


def test_a_client_that_goes_away_mid_stream_frees_the_cpu(pipeline):
    admission = Admission(wait_s=20.0)  # a held CPU would refuse the next request within 20 s
    demo, url = serve(pipeline("base"), admission, ApiConfig())
    body = {
        "model": "hybrid",
        "messages": [{"role": "user", "content": "Tell me everything."}],
        "max_tokens": 400,
        "stream": True,
    }
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
            next(response.iter_lines())  # the first event, then the client hangs up
        fine = {"model": "genai", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 2}
        assert httpx.post(f"{url}/v1/chat/completions", json=fine, timeout=60).status_code == 200
    finally:
        demo.close()


def test_a_page_answer_nobody_reads_on_still_frees_the_cpu(pipeline):
    from tests.page import make_service, session, settings

    admission = Admission(wait_s=20.0)
    service = make_service(pipeline("base"), admission=admission)
    updates = service.chat(
        {"text": "Tell me everything.", "files": []}, [], settings("hybrid", (300.0, 0.0)), [], session("gone")
    )
    next(updates), next(updates)  # the question shown, the first piece of the answer; then the tab is closed
    text, results = service.generate("Hello!", None, "genai", 2, 0.0, 0, session("next"))
    assert results[0]["route"] == "genai"
