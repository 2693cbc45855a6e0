"""Videos: frames sampled as the checkpoint's video processor samples them, prompts equal to the HF
processor's, M-RoPE positions equal to transformers', and greedy tokens of the hybrid route equal to
the PyTorch route's on two test models with different frame counts and sizes; bad videos are refused
with one clear line."""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest
import torch

from hybrid.config import MAX_VIDEO_FRAMES, VideoLimits
from hybrid.errors import RouteError, UserError
from hybrid.media import VIDEO
from hybrid.processor import Processor
from hybrid.rope import get_rope_index
from hybrid.types import Message, Request
from hybrid.videos import open_video
from tests.conftest import draw_scene, write_video
from tests.helpers import NEW_TOKENS, ask, hybrid_logits, reference_logits, run


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, str]:
    """Test clips: `short` 8 frames at 4 fps (2 s), `long` 40 frames at 10 fps (4 s, WebM), `blue`
    like `short` in another colour."""
    folder = tmp_path_factory.mktemp("clips")
    return {
        "short": str(write_video(folder / "short.mp4")),
        "long": str(write_video(folder / "long.webm", frames=40, size=(128, 96), fps=10, codec="libvpx-vp9")),
        "blue": str(write_video(folder / "blue.mp4", colour=(30, 30, 200))),
    }


@pytest.fixture(scope="module")
def processors(checkpoint) -> dict[str, Processor]:
    return {name: Processor(checkpoint(name), max_context=4096) for name in ("base", "wide")}


def video_request(pipe, clip: str, text: str = "What happens in this video?", images=(), **sampling) -> Request:
    video = pipe.open_video(clip)
    request = ask(text, images, **sampling)
    return replace(request, messages=(replace(request.messages[-1], videos=(video,)),))


# ---- sampling: the checkpoint's settings, within the runtime's cap -------------------------------------


def test_frames_follow_the_checkpoints_video_processor(processors, clips):
    # base: transformers' defaults, 2 frames a second, at least 4: a 2 s clip gives 4 of its 8 frames
    short = processors["base"].open_video(clips["short"], VideoLimits())
    assert short.frames_indices == (0, 2, 5, 7) and short.fps == 4 and short.total_num_frames == 8
    assert short.frames.shape == (4, 64, 96, 3) and short.frames.dtype == np.uint8
    # wide: 4 frames a second, at most 10: a 4 s clip would give 16, its own maximum keeps 10
    wide = processors["wide"].open_video(clips["long"], VideoLimits())
    assert len(wide.frames_indices) == 10 and wide.frames_indices[0] == 0 and wide.frames_indices[-1] == 39
    # the runtime's cap below the checkpoint's: 4 frames, spread over the whole clip
    capped = processors["wide"].open_video(clips["long"], VideoLimits(max_frames=4))
    assert capped.frames_indices == (0, 13, 26, 39)


def test_the_moving_square_is_where_the_sampled_frame_says(processors, clips):
    video = processors["base"].open_video(clips["short"], VideoLimits())
    red = (video.frames[..., 0] > 150) & (video.frames[..., 1] < 100)  # (F, H, W)
    columns = [np.flatnonzero(frame.any(axis=0)).mean() for frame in red]
    assert columns == sorted(columns) and columns[-1] - columns[0] > 40, columns


@pytest.mark.parametrize("name, clip", [("base", "short"), ("wide", "long")])
def test_prompt_equals_the_hf_processors(processors, clips, name, clip):
    processor = processors[name]
    video = processor.open_video(clips[clip], VideoLimits())
    messages = (Message("user", "What happens?", (draw_scene((64, 64), (30, 160, 30)),), (video,)),)
    ours = processor.prepare(messages)
    metadata = [
        {
            "total_num_frames": video.total_num_frames,
            "fps": video.fps,
            "frames_indices": list(video.frames_indices),
            "width": video.frames.shape[2],
            "height": video.frames.shape[1],
        }
    ]
    theirs = processor.hf(
        text=[processor.render(messages)],
        images=list(messages[0].images),
        videos=[video.frames],
        video_metadata=metadata,
        do_sample_frames=False,
        return_tensors="pt",
        images_kwargs={"size": processor.image_size(1024)},
        videos_kwargs={"size": processor.video_size(1024), "cap_pixels_per_frame": False},
    )
    np.testing.assert_array_equal(ours.input_ids, theirs["input_ids"].numpy())
    np.testing.assert_array_equal(ours.mm_token_type_ids, theirs["mm_token_type_ids"].numpy())
    assert torch.equal(ours.pixel_values_videos, theirs["pixel_values_videos"])
    assert torch.equal(ours.video_grid_thw, theirs["video_grid_thw"])
    assert "seconds>" in processor.tokenizer.decode(ours.input_ids[0]), "per-frame timestamps in the prompt"
    ((start, end),) = ours.spans(VIDEO)
    assert ours.video_tokens == (int((ours.input_ids[0, start:end] == processor.video_token_id).sum()),)


def test_video_budget_scales_the_frames_down(processors, clips):
    processor = processors["wide"]
    video = processor.open_video(clips["long"], VideoLimits())
    full = processor.prepare((Message("user", "?", (), (video,)),))
    capped = processor.prepare((Message("user", "?", (), (video,)),), max_video_tokens=20)
    assert capped.video_tokens[0] <= 20 < full.video_tokens[0]
    assert capped.video_grid_thw[0, 0] == full.video_grid_thw[0, 0] == 5, "every frame pair stays"


@pytest.mark.parametrize("name, clip", [("base", "short"), ("wide", "long")])
def test_positions_match_transformers(checkpoint, processors, clips, name, clip):
    from transformers import Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(str(checkpoint(name))).eval()
    processor = processors[name]
    video = processor.open_video(clips[clip], VideoLimits())
    picture = draw_scene((96, 64), (200, 30, 30))
    inputs = processor.prepare((Message("user", "Look, then answer.", (picture,), (video,)),))
    ours, delta = get_rope_index(
        inputs.mm_token_type_ids, inputs.image_grid_thw.numpy(), 2, inputs.video_grid_thw.numpy()
    )
    reference, reference_delta = model.model.get_rope_index(
        torch.from_numpy(inputs.input_ids),
        mm_token_type_ids=torch.from_numpy(inputs.mm_token_type_ids),
        image_grid_thw=inputs.image_grid_thw,
        video_grid_thw=inputs.video_grid_thw,
    )
    np.testing.assert_array_equal(ours, reference.numpy())
    assert delta == int(reference_delta[0, 0]) < 0


# ---- exactness: the hybrid route's greedy tokens are the PyTorch route's --------------------------------

PARITY = {
    "one video": ("base", "short", ()),
    "a picture and a video": ("base", "short", (draw_scene((64, 96), (30, 30, 200)),)),
    "ten frames, 3 DeepStack layers": ("wide", "long", ()),
}


@pytest.mark.parametrize("case", list(PARITY))
def test_hybrid_tokens_equal_pytorch(pipeline, clips, case):
    name, clip, images = PARITY[case]
    pipe = pipeline(name)
    request = video_request(pipe, clips[clip], images=images)
    ours = run(pipe, request, "hybrid")
    reference = run(pipe, request, "pytorch")
    assert len(set(reference["token_ids"])) > NEW_TOKENS // 3, "greedy output should be varied"
    assert ours["token_ids"] == reference["token_ids"] and ours["text"] == reference["text"]
    assert (
        ours["timings"]["video_tokens"] == reference["timings"]["video_tokens"]
        and ours["timings"]["video_tokens"][0] > 0
    )
    assert ours["timings"]["vision_ms"] > 0


@pytest.mark.parametrize("name, clip", [("base", "short"), ("wide", "long")])
def test_per_step_logits_agree(pipeline, clips, name, clip):
    pipe = pipeline(name)
    request = video_request(pipe, clips[clip])
    generated = run(pipe, request, "pytorch")["token_ids"]
    route = pipe.routes["hybrid"]
    inputs = route.processor.prepare(request.messages)
    ours = hybrid_logits(route, inputs, generated)
    reference = reference_logits(pipe.routes["pytorch"].model, inputs, generated)
    np.testing.assert_allclose(ours, reference, atol=1e-3, rtol=0)


def test_another_video_changes_the_answer(pipeline, clips):
    """The test has teeth: the video's pixels reach the model."""
    pipe = pipeline("base")
    red = run(pipe, video_request(pipe, clips["short"]), "hybrid")["token_ids"]
    blue = run(pipe, video_request(pipe, clips["blue"]), "hybrid")["token_ids"]
    assert red != blue


def test_the_text_route_never_gets_a_video(pipeline, clips):
    pipe = pipeline("base")
    request = video_request(pipe, clips["short"])
    assert pipe.plan(request, "auto") == ("hybrid",)
    assert "genai" not in pipe.plan(request, "compare")
    with pytest.raises(RouteError, match="serves text only: this conversation has a video"):
        pipe.plan(request, "genai")


# ---- bad videos: one clear line each ----------------------------------------------------------------


@pytest.fixture(scope="module")
def bad(tmp_path_factory, clips) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("bad-videos")
    whole = write_video(folder / "whole.mp4", frames=40, options={"movflags": "faststart"}).read_bytes()
    files = {
        "not_video.mp4": b"%PDF-1.4 not a video at all",
        "empty.mp4": b"",
        "truncated.mp4": whole[: len(whole) // 2],  # the header promises 40 frames
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    draw_scene((32, 32), (200, 0, 0)).save(folder / "still.mp4", format="PNG")
    write_video(folder / "too_long.mp4", frames=121, size=(16, 16), fps=1)  # 121 s
    return {name.removesuffix(".mp4"): str(folder / name) for name in [*files, "still.mp4", "too_long.mp4"]}


BAD = [
    ("not a video", "not_video", VideoLimits(), "not_video.mp4 is not a readable video"),
    ("0-byte file", "empty", VideoLimits(), "is not a readable video"),
    ("truncated", "truncated", VideoLimits(), r"truncated or corrupt: it ends after \d+ of the 40 frames"),
    ("too long", "too_long", VideoLimits(), "too_long.mp4 is 121 s long, the limit is 120 s"),
    ("too many frames in the file", "short", VideoLimits(max_file_frames=6), "has 8 frames, more than the limit of 6"),
    ("frames too large", "short", VideoLimits(max_frame_pixels=1000), "96x64 frames, more than the limit"),
    ("a still picture", "still", VideoLimits(), "a video needs at least 2"),
]


@pytest.mark.parametrize("case, clip, limits, message", BAD, ids=[case[0] for case in BAD])
def test_bad_videos_are_refused_with_one_line(processors, clips, bad, case, clip, limits, message):
    with pytest.raises(UserError) as refused:
        processors["base"].open_video({**clips, **bad}[clip], limits)
    text = str(refused.value)
    assert re.search(message, text) and "\n" not in text and "/tmp" not in text, text


def test_too_many_frames_asked_is_refused():
    with pytest.raises(UserError, match=f"too many frames: 65 asked per video, the limit is {MAX_VIDEO_FRAMES}"):
        VideoLimits(max_frames=MAX_VIDEO_FRAMES + 1)
    with pytest.raises(UserError, match="video frames must be >= 2"):
        VideoLimits(max_frames=1)


def test_a_template_without_videos_is_refused(checkpoint, clips, tmp_path):
    from hybrid.launch import DEMO_MODEL

    processor = Processor(DEMO_MODEL, max_context=4096)  # its template places pictures only
    assert not processor.takes_videos
    video = open_video(clips["short"], lambda info: [0, 1])
    with pytest.raises(UserError, match="chat template has no place for a video"):
        processor.prepare((Message("user", "?", (), (video,)),))


# ---- conversation reuse with a video in it ------------------------------------------------------------


def follow_up(pipe, first_video, second_video, cid: str) -> Request:
    """Turn 1 about `first_video` (its cache kept under `cid`), then a follow-up whose first turn holds
    `second_video` (the same clip, or another one in its place)."""
    first = replace(video_request(pipe, first_video), conversation_id=cid)
    answer = run(pipe, first, "hybrid")
    history = (
        replace(first.messages[-1], videos=(pipe.open_video(second_video),)),
        Message("assistant", answer["text"]),
    )
    return replace(ask("And where does it go?", history=history), conversation_id=cid)


def test_a_follow_up_reuses_the_video_and_answers_as_a_fresh_prefill(pipeline, clips):
    pipe = pipeline("base")
    second = follow_up(pipe, clips["short"], clips["short"], "video-same")
    video_end = pipe.processor.prepare(second.messages).spans(VIDEO)[0][1]
    reused = run(pipe, second, "hybrid")
    fresh = run(pipe, replace(second, conversation_id=None), "hybrid")
    assert reused["timings"]["reused_tokens"] >= video_end and fresh["timings"]["reused_tokens"] == 0
    assert reused["token_ids"] == fresh["token_ids"] == run(pipe, second, "pytorch")["token_ids"]


def test_another_video_in_the_same_place_is_not_reused(pipeline, clips):
    """Video tokens share one id, and both clips give the same timestamps: only the pixels differ."""
    pipe = pipeline("base")
    second = follow_up(pipe, clips["short"], clips["blue"], "video-swap")
    video_start = pipe.processor.prepare(second.messages).spans(VIDEO)[0][0]
    swapped = run(pipe, second, "hybrid")
    assert swapped["timings"]["reused_tokens"] == video_start
    assert swapped["token_ids"] == run(pipe, replace(second, conversation_id=None), "hybrid")["token_ids"]


# ---- the page and the CLI --------------------------------------------------------------------------

PAGE_GREEDY = (12.0, 0.0, 1.0, 0.0, 1.0, 0.0)  # max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed


def test_the_page_answers_a_video_and_shows_it_in_the_question(pipeline, clips):
    from tests.page import chat_updates, last, make_service
    from web.view import to_chatbot

    service = make_service(pipeline("base"))
    updates = chat_updates(
        service, {"text": "What happens?", "files": [clips["short"]]}, (), "auto", PAGE_GREEDY, name="video"
    )
    turns = last(updates, "turns")
    assert len(turns[0].videos) == 1 and not turns[0].images and turns[0].videos[0].frames_indices == (0, 2, 5, 7)
    assert to_chatbot(turns)[0]["content"][0] == {"path": clips["short"]}, "the question shows the video"
    assert turns[1].route == "hybrid" and turns[1].done
    table = last(updates, "latency")
    assert int(table["video tokens"][0]) == turns[1].timings.video_tokens[0] > 0


def test_the_page_refuses_bad_videos_and_keeps_serving(pipeline, clips, bad):
    import gradio as gr

    from tests.page import chat_updates, last, make_service

    service = make_service(pipeline("base"))
    for clip, message in (
        (bad["truncated"], "truncated or corrupt"),
        (bad["not_video"], "not a readable video"),
        (bad["too_long"], "the limit is 120 s"),
    ):
        with pytest.raises(gr.Error, match=message):
            chat_updates(service, {"text": "What happens?", "files": [clip]}, (), "auto", PAGE_GREEDY, name="bad")
    turns = last(
        chat_updates(service, {"text": "What?", "files": [clips["short"]] * 2}, (), "auto", PAGE_GREEDY, name="bad"),
        "turns",
    )
    with pytest.raises(gr.Error, match="3 videos in the conversation, the limit is 2"):
        chat_updates(service, {"text": "And this?", "files": [clips["blue"]]}, turns, "auto", PAGE_GREEDY, name="bad")


CLI_BAD = [
    ("not a video", ["--video", "{not_video}"], "is not a readable video"),
    ("truncated", ["--video", "{truncated}"], "truncated or corrupt"),
    ("too long", ["--video", "{too_long}"], "is 121 s long, the limit is 120 s"),
    ("too many frames asked", ["--video", "{short}", "--video-frames", "65"], "too many frames: 65 asked per video"),
    ("too many videos", ["--video", "{short}"] * 3, "3 videos in the conversation, the limit is 2"),
    (
        "a video to the text route",
        ["--video", "{short}", "--route", "genai"],
        "serves text only: this conversation has a video",
    ),
]


def cli(bundle_dir, extra: list[str]) -> list[str]:
    return [
        "generate",
        "--bundle",
        str(bundle_dir),
        "--prompt",
        "What happens?",
        "--max-new-tokens",
        "6",
        "--json",
        *extra,
    ]


@pytest.mark.parametrize("case, extra, message", CLI_BAD, ids=[case[0] for case in CLI_BAD])
def test_cli_refuses_bad_videos_with_one_line(bundle, clips, bad, capsys, case, extra, message):
    from hybrid.__main__ import main

    args = cli(bundle("base"), [arg.format(**clips, **bad) for arg in extra])
    capsys.readouterr()
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_cli_answers_a_video_on_both_routes_alike(bundle, clips, capsys):
    import json

    from hybrid.__main__ import main

    capsys.readouterr()
    assert main(cli(bundle("wide"), ["--video", clips["long"], "--route", "compare"])) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["route"] for r in results] == ["pytorch", "hybrid"]
    assert results[0]["token_ids"] == results[1]["token_ids"] and results[1]["timings"]["video_tokens"][0] > 0


def test_a_video_too_thin_for_the_processor_is_refused_with_one_line(processors, tmp_path):
    processor = processors["base"]
    video = processor.open_video(write_video(tmp_path / "thin.mp4", size=(420, 2)), VideoLimits())
    with pytest.raises(UserError, match=r"^the video is 420x2 pixels: .* at most 200 times the short one"):
        processor.prepare((Message("user", "What happens?", videos=(video,)),))
