"""The checkpoint's own HF processor, wrapped: a conversation in, model inputs out.

`Processor.prepare` renders the messages with the checkpoint's chat template and runs the real
`Qwen3VLProcessor`'s parts on the text, images and videos (each video's placeholder, per-frame
timestamps included, is the processor's own). Token ids (image and video pads, EOS) come from the
checkpoint; so does the choice of a video's frames (`frame_indices`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from hybrid.config import DEFAULT_MAX_IMAGE_TOKENS, DEFAULT_MAX_VIDEO_TOKENS, VideoLimits
from hybrid.errors import BundleError, UserError
from hybrid.images import to_rgb
from hybrid.media import IMAGE, MEDIA, MM_TEXT, VIDEO, Media
from hybrid.recent import Recent
from hybrid.thinking import opens_thinking
from hybrid.types import Message, Video
from hybrid.videos import VideoInfo, open_video

if TYPE_CHECKING:
    from transformers import BatchFeature

# Private-use characters mark where message texts go in the rendered template.
_SENTINEL_OPEN, _SENTINEL_CLOSE = "\ue000", "\ue001"
_SENTINEL = re.compile(f"{_SENTINEL_OPEN}(\\d+){_SENTINEL_CLOSE}")


def pixel_digest(pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> str:
    """A digest of images' patches and grids: equal digests, equal pictures for the model."""
    digest = hashlib.sha256(pixel_values.numpy().tobytes())
    digest.update(image_grid_thw.numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class PreparedInputs:
    """Everything the routes need for one prompt; tensors keep transformers' names and shapes."""

    input_ids: np.ndarray  # (1, S) int64
    mm_token_type_ids: np.ndarray  # (1, S) int64: 0 text, 1 image, 2 video
    pixel_values: torch.Tensor | None = None  # (patches, C * T * P * P)
    image_grid_thw: torch.Tensor | None = None  # (images, 3)
    image_tokens: tuple[int, ...] = ()  # <|image_pad|> tokens of each image, in prompt order
    image_digests: tuple[str, ...] = ()  # `pixel_digest` of each image, in prompt order
    pixel_values_videos: torch.Tensor | None = None  # (patches, C * T * P * P), every video's frames
    video_grid_thw: torch.Tensor | None = None  # (videos, 3): t counts pairs of frames
    video_tokens: tuple[int, ...] = ()  # <|video_pad|> tokens of each video (all its frames), in prompt order
    video_digests: tuple[str, ...] = ()  # `pixel_digest` of each video, in prompt order

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    def pixels(self, kind: Media) -> torch.Tensor | None:
        """The patches of every item of `kind` `(patches, C * T * P * P)`."""
        return getattr(self, kind.pixel_values)

    def grid(self, kind: Media) -> torch.Tensor | None:
        """The grids of the items of `kind` `(items, 3)`."""
        return getattr(self, kind.grid_thw)

    def tokens(self, kind: Media) -> tuple[int, ...]:
        """The pad tokens of each item of `kind`, in prompt order."""
        return getattr(self, kind.tokens)

    def digests(self, kind: Media) -> tuple[str, ...]:
        """The `pixel_digest` of each item of `kind`, in prompt order: equal digests, equal items."""
        return getattr(self, kind.digests)

    def vision_kwargs(self) -> dict[str, torch.Tensor]:
        """The pictures and videos as transformers' model takes them (`pixel_values`, `image_grid_thw`,
        `pixel_values_videos`, `video_grid_thw`), those present."""
        given = {key: getattr(self, key) for kind in MEDIA for key in (kind.pixel_values, kind.grid_thw)}
        return {name: value for name, value in given.items() if value is not None}

    def spans(self, kind: Media) -> list[tuple[int, int]]:
        """`[start, end)` of each item of `kind` in the prompt, in prompt order: an image's
        `<|image_pad|>` run; a video from its first frame pair's `<|video_pad|>` run to its last
        one's (the timestamps and vision markers between them inside)."""
        runs = _runs(self.mm_token_type_ids[0], kind.mm_type)
        grid = self.grid(kind)
        counts = grid[:, 0].tolist() if kind.frame_pair_runs and grid is not None else [1] * len(runs)
        ends = np.cumsum(counts).tolist()
        return [(runs[end - n][0], runs[end - 1][1]) for n, end in zip(counts, ends)]

    def media_end(self) -> int:
        """Where the prompt's last image or video ends (0 when it has none)."""
        return max((end for kind in MEDIA for _, end in self.spans(kind)), default=0)

    def head(self, end: int) -> PreparedInputs:
        """The prompt's first `end` tokens; every image and video must be inside them."""
        if end < self.media_end():
            raise ValueError(f"an image or a video ends after token {end}")
        return replace(self, input_ids=self.input_ids[:, :end], mm_token_type_ids=self.mm_token_type_ids[:, :end])

    def tail(self, start: int) -> PreparedInputs:
        """The prompt from token `start` on, with only the images and videos inside it; `start`
        must not cut one."""
        spans = {kind: self.spans(kind) for kind in MEDIA}
        if any(s < start < e for found in spans.values() for s, e in found):
            raise ValueError(f"token {start} is inside an image or a video")
        kept: dict[str, object] = {}
        for kind, found in spans.items():
            first = sum(1 for _, e in found if e <= start)
            kept[kind.pixel_values], kept[kind.grid_thw] = _from(self.pixels(kind), self.grid(kind), first)
            kept[kind.tokens] = self.tokens(kind)[first:]
            kept[kind.digests] = self.digests(kind)[first:]
        return replace(
            self, input_ids=self.input_ids[:, start:], mm_token_type_ids=self.mm_token_type_ids[:, start:], **kept
        )


def _runs(types: np.ndarray, kind: int) -> list[tuple[int, int]]:
    """`[start, end)` of each run of `kind` in `types` `(S,)`."""
    inside = np.concatenate([[0], (types == kind).astype(np.int64), [0]])
    edges = np.flatnonzero(np.diff(inside))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def _rows(pixels: torch.Tensor, grid_thw: torch.Tensor, index: int) -> torch.Tensor:
    """The patch rows of item `index` of `pixels`, whose items have the grids `grid_thw` `(items, 3)`."""
    sizes = grid_thw.prod(-1).tolist()
    start = sum(sizes[:index])
    return pixels[start : start + sizes[index]]


def _from(
    pixels: torch.Tensor | None, grid_thw: torch.Tensor | None, first: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The patches and grids of items `first` on (None, None when there are none)."""
    if grid_thw is None or first >= len(grid_thw):
        return None, None
    offset = int(grid_thw[:first].prod(-1).sum())
    return pixels[offset:], grid_thw[first:]


MAX_ASPECT = 200  # the longest side over the shortest that the Qwen-VL processors take


def _check_aspect(width: int, height: int, what: str) -> None:
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise UserError(
            f"the {what} is {width}x{height} pixels: the model reads only pictures and videos whose long side "
            f"is at most {MAX_ASPECT} times the short one; crop or pad it"
        )


@dataclass(frozen=True)
class Picture:
    """One image as the model takes it: its patches `(patches, C * T * P * P)`, grid `(1, 3)` and their digest."""

    pixel_values: torch.Tensor
    grid_thw: torch.Tensor
    digest: str


PICTURES_KEPT, PICTURE_BYTES_KEPT = 8, 256 << 20  # processed pictures kept for the next turns that show them


def _picture_bytes(picture: Picture) -> int:
    return picture.pixel_values.numel() * picture.pixel_values.element_size()


class Processor:
    """Chat template + tokenizer + image processor of one checkpoint."""

    def __init__(self, path: str | Path, max_context: int) -> None:
        from transformers import AutoProcessor

        try:
            self.hf = AutoProcessor.from_pretrained(str(path))
        except (OSError, ValueError) as exc:
            raise BundleError(f"cannot load the processor from {path}: {exc}") from exc
        self.tokenizer = self.hf.tokenizer
        self.token_ids: dict[Media, int] = {kind: int(getattr(self.hf, kind.token_id)) for kind in MEDIA}
        self.image_token_id, self.video_token_id = self.token_ids[IMAGE], self.token_ids[VIDEO]  # transformers' names
        self.eos_token_ids: tuple[int, ...] = _eos_ids(Path(path), self.tokenizer)
        self.max_context = max_context
        self.opens_thinking = opens_thinking(self.render((Message("user", "?"),)))  # a Thinking template
        self.takes_videos = self.hf.video_processor is not None and self._places_videos()
        self.pictures: Recent[Picture] = Recent(PICTURES_KEPT, PICTURE_BYTES_KEPT, _picture_bytes)

    def render(self, messages: tuple[Message, ...]) -> str:
        """The chat-templated prompt text, ending with the assistant's turn opener."""
        conversation = [_to_hf_message(m) for m in messages]
        return self.hf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)

    def prepare(
        self,
        messages: tuple[Message, ...],
        max_image_tokens: int = DEFAULT_MAX_IMAGE_TOKENS,
        max_video_tokens: int = DEFAULT_MAX_VIDEO_TOKENS,
    ) -> PreparedInputs:
        """Tokenize the conversation. Message texts are always plain text: a `<|im_end|>` or
        `<|image_pad|>` typed by a user becomes ordinary characters, never a control token.
        Each image is scaled (aspect kept) to at most `max_image_tokens` image tokens, each video's
        frames to at most `max_video_tokens` video tokens for the whole video, and never beyond
        the checkpoint's own limits."""
        fields, placeholders = self._media(messages, {IMAGE: max_image_tokens, VIDEO: max_video_tokens})
        ids = self._tokenize(messages, placeholders)
        if ids.shape[1] >= self.max_context:
            raise UserError(
                f"the prompt is {ids.shape[1]} tokens, the model's context is {self.max_context}: "
                "shorten it or start a new conversation"
            )
        types = np.full(ids.shape, MM_TEXT, dtype=np.int64)
        for kind, token_id in self.token_ids.items():
            types[ids == token_id] = kind.mm_type
        return PreparedInputs(input_ids=ids, mm_token_type_ids=types, **fields)

    def _media(
        self, messages: tuple[Message, ...], budgets: dict[Media, int]
    ) -> tuple[dict[str, object], dict[Media, list[str]]]:
        """The `PreparedInputs` fields of the conversation's images and videos (patches, grids, pad
        tokens and digest of each), and each item's placeholder text, by kind; kinds it lacks are left out."""
        fields: dict[str, object] = {}
        placeholders: dict[Media, list[str]] = {}
        for kind in MEDIA:
            items = [item for m in messages for item in getattr(m, kind.items)]
            if not items:
                continue
            if kind is VIDEO:
                batch = self._videos(items, budgets[kind])
                grids = batch[kind.grid_thw]
                digests = tuple(
                    pixel_digest(_rows(batch[kind.pixel_values], grids, i), grids[i : i + 1]) for i in range(len(items))
                )
            else:
                batch, digests = self._images(items, budgets[kind])
            grid_thw = batch[kind.grid_thw]
            merge = getattr(self.hf, kind.processor).merge_size
            fields[kind.pixel_values], fields[kind.grid_thw] = batch[kind.pixel_values], grid_thw
            fields[kind.tokens] = tuple((grid_thw.prod(-1) // merge**2).tolist())
            fields[kind.digests] = digests
            placeholders[kind] = [getattr(self.hf, kind.placeholder)(batch, i) for i in range(len(items))]
        return fields, placeholders

    def _images(
        self, images: list[Image.Image], max_image_tokens: int
    ) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
        """The image processor's batch (`pixel_values`, `image_grid_thw`) and each image's digest.
        A picture processed at the same size before (the same conversation's next turn) is reused."""
        size = self.image_size(max_image_tokens)
        for img in images:
            _check_aspect(img.width, img.height, "picture")
        pictures = [self._picture(to_rgb(img), size) for img in images]
        batch = {
            IMAGE.pixel_values: torch.cat([p.pixel_values for p in pictures]),
            IMAGE.grid_thw: torch.cat([p.grid_thw for p in pictures]),
        }
        return batch, tuple(p.digest for p in pictures)

    def _picture(self, image: Image.Image, size: dict[str, int]) -> Picture:
        """One RGB image as the model takes it at `size`, from the cache of recent ones or processed now."""
        content = hashlib.sha256(image.tobytes())  # with SHA extensions, 3x BLAKE2's speed on this CPU
        content.update(json.dumps([image.size, sorted(size.items())]).encode())
        key = content.hexdigest()
        picture = self.pictures.get(key)
        if picture is None:
            batch = self.hf.image_processor(images=[image], return_tensors="pt", size=size)
            pixels, grid = batch[IMAGE.pixel_values], batch[IMAGE.grid_thw]
            picture = Picture(pixels, grid, pixel_digest(pixels, grid))
            self.pictures.put(key, picture)
        return picture

    def image_size(self, max_image_tokens: int) -> dict[str, int]:
        """The image processor's `size` (pixel counts) for a budget of `max_image_tokens` per image:
        one token covers `(patch * merge)^2` pixels; the checkpoint's limits still apply."""
        processor = self.hf.image_processor
        return _budget(processor.size, (processor.patch_size * processor.merge_size) ** 2, max_image_tokens)

    def video_size(self, max_video_tokens: int) -> dict[str, int]:
        """The video processor's `size` (pixel counts over all frames) for `max_video_tokens` per
        video: one token covers `(patch * merge)^2` pixels of `temporal_patch_size` frames."""
        processor = self.hf.video_processor
        token_pixels = (processor.patch_size * processor.merge_size) ** 2 * processor.temporal_patch_size
        return _budget(processor.size, token_pixels, max_video_tokens)

    def frame_indices(self, info: VideoInfo, max_frames: int) -> list[int]:
        """The frames of a video that the checkpoint's video processor samples (its `fps`, or
        `num_frames`, within its `min_frames` and `max_frames`); at most `max_frames` of them,
        spread evenly over the video."""
        processor = self.hf.video_processor
        if processor is None:
            raise UserError("this checkpoint's processor has no video processor: it does not read videos")
        metadata = _metadata(info.total_num_frames, info.fps, info.width, info.height)
        own = processor.num_frames
        indices = processor.sample_frames(metadata, num_frames=own, fps=None if own else processor.fps)
        if len(indices) > max_frames:
            indices = processor.sample_frames(metadata, num_frames=max_frames)
        return [int(i) for i in indices]

    def open_video(self, source: str | Path | bytes, limits: VideoLimits) -> Video:
        """A video file's frames as this checkpoint samples them, within `limits`."""
        return open_video(source, lambda info: self.frame_indices(info, limits.max_frames), limits)

    def _videos(self, videos: list[Video], max_video_tokens: int) -> BatchFeature:
        """The video processor's batch: `pixel_values_videos`, `video_grid_thw` and the metadata that
        each video's placeholder (per frame pair: its timestamp, then its pads) is written from."""
        if not self.takes_videos:
            raise UserError("this model's chat template has no place for a video: ask about pictures instead")
        for v in videos:
            _check_aspect(v.frames.shape[2], v.frames.shape[1], "video")
        metadata = [
            _metadata(v.total_num_frames, v.fps, v.frames.shape[2], v.frames.shape[1], list(v.frames_indices))
            for v in videos
        ]
        return self.hf.video_processor(
            videos=[v.frames for v in videos],
            video_metadata=metadata,
            do_sample_frames=False,
            return_metadata=True,
            size=self.video_size(max_video_tokens),
            cap_pixels_per_frame=False,
            return_tensors="pt",
        )

    def _places_videos(self) -> bool:
        """Whether the chat template renders a video item (the demo model's, for one, does not)."""
        probe = {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "?"}]}
        rendered = self.hf.apply_chat_template([probe], tokenize=False, add_generation_prompt=True)
        return self.hf.video_token in rendered

    def _tokenize(self, messages: tuple[Message, ...], placeholders: dict[Media, list[str]]) -> np.ndarray:
        """The template is rendered around sentinels; template pieces are tokenized with special
        tokens (each image's and video's placeholder expanded to its text: an image's patch count
        of pads, a video's timestamps and pads), message texts without."""
        marked = tuple(
            replace(m, text=f"{_SENTINEL_OPEN}{i}{_SENTINEL_CLOSE}" if m.text else "") for i, m in enumerate(messages)
        )
        pieces = _SENTINEL.split(self.render(marked))
        kinds = {getattr(self.hf, kind.pad): kind for kind in MEDIA}
        pad = re.compile("|".join(map(re.escape, kinds)))
        left = {kind: iter(placeholders.get(kind, ())) for kind in MEDIA}

        def expand(match: re.Match) -> str:
            return next(left[kinds[match.group()]])

        ids: list[int] = []
        for k, piece in enumerate(pieces):
            if k % 2:
                text, split = messages[int(piece)].text, True
            else:
                text, split = pad.sub(expand, piece), False
            ids += self.tokenizer(text, add_special_tokens=False, split_special_tokens=split)["input_ids"]
        for kind, texts in left.items():
            if next(texts, None) is not None:
                raise UserError(
                    f"the chat template did not place every {kind.name}; the checkpoint's template is unusual"
                )
        return np.array([ids], dtype=np.int64)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def hf_content(text: str, images: int, videos: int = 0) -> list[dict]:
    """A turn's content as the chat template reads it: `images` image placeholders, `videos` video
    placeholders, then the text."""
    content: list[dict] = [{"type": "image"} for _ in range(images)] + [{"type": "video"} for _ in range(videos)]
    if text:
        content.append({"type": "text", "text": text})
    return content


def _budget(own, token_pixels: int, max_tokens: int) -> dict[str, int]:
    """A processor `size` (`shortest_edge`, `longest_edge` in pixels) within its own `own` and at
    most `max_tokens` tokens of `token_pixels` pixels each."""
    longest = min(int(own["longest_edge"]), max_tokens * token_pixels)
    return {"shortest_edge": min(int(own["shortest_edge"]), longest), "longest_edge": longest}


def _metadata(total_num_frames: int, fps: float, width: int, height: int, frames_indices: list[int] | None = None):
    """transformers' `VideoMetadata` of a video file (and of the frames taken from it)."""
    from transformers.video_utils import VideoMetadata

    return VideoMetadata(
        total_num_frames=total_num_frames,
        fps=fps,
        width=width,
        height=height,
        duration=total_num_frames / fps,
        frames_indices=frames_indices,
    )


def _to_hf_message(message: Message) -> dict:
    return {"role": message.role, "content": hf_content(message.text, len(message.images), len(message.videos))}


def _eos_ids(path: Path, tokenizer) -> tuple[int, ...]:
    """EOS ids from generation_config.json (what `generate` stops on), else the tokenizer's EOS."""
    gen_path = path / "generation_config.json"
    ids: list[int] = []
    if gen_path.is_file():
        eos = json.loads(gen_path.read_text()).get("eos_token_id")
        ids = [eos] if isinstance(eos, int) else list(eos or [])
    if not ids and tokenizer.eos_token_id is not None:
        ids = [int(tokenizer.eos_token_id)]
    if not ids:
        raise BundleError(f"no EOS token id in {gen_path} or the tokenizer")
    return tuple(int(i) for i in ids)
