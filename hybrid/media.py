"""The visual kinds, image and video: one record each of what tells them apart.

A kind names its fields as transformers does (`pixel_values`, `image_grid_thw`, ...), so code that
handles pictures and videos walks `MEDIA` once instead of spelling each kind out.
"""

from __future__ import annotations

from dataclasses import dataclass

MM_TEXT, MM_IMAGE, MM_VIDEO = 0, 1, 2  # `mm_token_type_ids` values, as transformers numbers them


@dataclass(frozen=True)
class Media:
    name: str  # "image", "video", as messages to the user say it
    items: str  # the `Message` and `Request` field that holds them, and their plural
    mm_type: int  # its `mm_token_type_ids` value
    token_id: str  # the HF processor's attribute holding the pad token's id
    pad: str  # the HF processor's attribute holding the pad token's text
    processor: str  # the HF processor's attribute holding this kind's own processor
    placeholder: str  # the HF processor's method writing an item's placeholder text from the batch
    pixel_values: str  # the batch key (and `PreparedInputs` field) of the patches
    grid_thw: str  # the batch key (and `PreparedInputs` field) of the grids `(items, 3)`
    tokens: str  # the `PreparedInputs` and `Stopwatch` field with each item's pad tokens
    digests: str  # the `PreparedInputs` field with each item's `pixel_digest`
    limit: str  # the `RuntimeConfig` field capping how many a conversation may hold
    frame_pair_runs: bool  # each pair of frames is a pad run of its own (a video: timestamps between)


IMAGE = Media(
    name="image",
    items="images",
    mm_type=MM_IMAGE,
    token_id="image_token_id",
    pad="image_token",
    processor="image_processor",
    placeholder="replace_image_token",
    pixel_values="pixel_values",
    grid_thw="image_grid_thw",
    tokens="image_tokens",
    digests="image_digests",
    limit="max_images",
    frame_pair_runs=False,
)
VIDEO = Media(
    name="video",
    items="videos",
    mm_type=MM_VIDEO,
    token_id="video_token_id",
    pad="video_token",
    processor="video_processor",
    placeholder="replace_video_token",
    pixel_values="pixel_values_videos",
    grid_thw="video_grid_thw",
    tokens="video_tokens",
    digests="video_digests",
    limit="max_videos",
    frame_pair_runs=True,
)
MEDIA: tuple[Media, ...] = (IMAGE, VIDEO)  # in the order a turn renders them
