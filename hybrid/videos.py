"""Opening user videos with PyAV: the frames a checkpoint samples, or a one-line error that says why not.

`open_video` reads the container's header (frame count, frame rate, size) and refuses what is not a
video or is past the `VideoLimits` before decoding anything; `pick` (the checkpoint's sampling) then
chooses the frames from the header's numbers, and the file is decoded up to the last one chosen.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hybrid.config import VideoLimits
from hybrid.errors import UserError
from hybrid.types import Video

# What the page treats as a video upload (anything else goes to the image reader).
VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi", ".mpg", ".mpeg", ".ogv", ".3gp"})


@dataclass(frozen=True)
class VideoInfo:
    """A video stream as its container describes it."""

    total_num_frames: int
    fps: float
    width: int
    height: int


def is_video_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def open_video(
    source: str | Path | bytes, pick: Callable[[VideoInfo], Sequence[int]], limits: VideoLimits = VideoLimits()
) -> Video:
    """Decode the frames `pick` chooses (increasing indices) from a file path or raw bytes."""
    av = _import_av()
    name = "video" if isinstance(source, bytes) else Path(source).name  # never the server's folders
    try:
        container = av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source))
    except FileNotFoundError as exc:
        raise UserError(f"cannot open {name}: {exc.strerror or exc}") from exc
    except (av.error.FFmpegError, OSError) as exc:
        raise UserError(f"{name} is not a readable video (MP4, WebM, MOV, MKV, AVI ...)") from exc
    with container:
        if not container.streams.video:
            raise UserError(f"{name} holds no video stream: not a video, or a truncated one")
        stream = container.streams.video[0]
        info = _probe(container, stream, name, limits)
        indices = [int(i) for i in pick(info)]
        frames = _decode(container, stream, indices, info, name)
    return Video(np.stack(frames), info.fps, tuple(indices), info.total_num_frames, name)


def _import_av():
    try:
        import av
    except ImportError as exc:
        raise UserError("reading videos needs PyAV: pip install av") from exc
    return av


def _probe(container, stream, name: str, limits: VideoLimits) -> VideoInfo:
    """The stream's numbers from the header, refused past the limits; a frame count the header
    leaves out is counted from the packets (no decoding)."""
    rate = stream.average_rate or stream.guessed_rate
    if not rate or rate <= 0:
        raise UserError(f"{name} has no frame rate: not a video, or a damaged one")
    fps = float(rate)
    if stream.width * stream.height > limits.max_frame_pixels:
        raise UserError(
            f"{name} has {stream.width}x{stream.height} frames, more than the limit of "
            f"{limits.max_frame_pixels:,} pixels a frame: scale it down first"
        )
    seconds = container.duration / 1e6 if container.duration else stream.frames / fps
    if seconds > limits.max_seconds:
        raise UserError(f"{name} is {seconds:.0f} s long, the limit is {limits.max_seconds:.0f} s: trim it first")
    total = stream.frames or _count_packets(container, stream, limits.max_file_frames + 1)
    if total > limits.max_file_frames:
        raise UserError(
            f"{name} has {total:,} frames, more than the limit of {limits.max_file_frames:,}: "
            "lower its frame rate or trim it first"
        )
    if total < 2:
        raise UserError(f"{name} has {total} frame(s), a video needs at least 2: send a still picture as an image")
    return VideoInfo(total, fps, stream.width, stream.height)


def _count_packets(container, stream, stop: int) -> int:
    count = 0
    for packet in container.demux(stream):
        count += packet.size > 0  # the demuxer ends with an empty flush packet
        if count >= stop:
            break
    container.seek(0)
    return count


def _decode(container, stream, indices: list[int], info: VideoInfo, name: str) -> list[np.ndarray]:
    """The frames at `indices`, RGB at the stream's size; a file that ends before the last one (or
    breaks on the way) is truncated or corrupt."""
    av = _import_av()
    wanted, last = set(indices), max(indices)
    stream.thread_type = "AUTO"
    found: dict[int, np.ndarray] = {}
    decoded = 0
    try:
        for decoded, frame in enumerate(container.decode(stream), start=1):
            if decoded - 1 in wanted:
                found[decoded - 1] = frame.to_ndarray(format="rgb24", width=info.width, height=info.height)
            if decoded > last:
                break
    except av.error.FFmpegError as exc:
        raise UserError(f"{name} is truncated or corrupt: {exc}") from exc
    if len(found) < len(wanted):
        raise UserError(
            f"{name} is truncated or corrupt: it ends after {decoded} of the {info.total_num_frames} frames "
            "its header announces"
        )
    return [found[i] for i in indices]
