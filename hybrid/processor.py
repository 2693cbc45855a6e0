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

import numpy as np
import torch

from hybrid.config import DEFAULT_MAX_IMAGE_TOKENS, DEFAULT_MAX_VIDEO_TOKENS, VideoLimits
from hybrid.errors import BundleError, UserError
from hybrid.images import to_rgb
from hybrid.thinking import opens_thinking
from hybrid.types import MM_IMAGE, MM_TEXT, MM_VIDEO, Message, Video
from hybrid.videos import VideoInfo, open_video

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
    pixel_values: torch.Tensor | None  # (patches, C * T * P * P)
    image_grid_thw: torch.Tensor | None  # (images, 3)
    image_tokens: tuple[int, ...] = ()  # <|image_pad|> tokens of each image, in prompt order
    pixel_values_videos: torch.Tensor | None = None  # (patches, C * T * P * P), every video's frames
    video_grid_thw: torch.Tensor | None = None  # (videos, 3): t counts pairs of frames
    video_tokens: tuple[int, ...] = ()  # <|video_pad|> tokens of each video (all its frames), in prompt order

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    def vision_kwargs(self) -> dict[str, torch.Tensor]:
        """The pictures and videos as transformers' model takes them (`pixel_values`, `image_grid_thw`,
        `pixel_values_videos`, `video_grid_thw`), those present."""
        given = {
            "pixel_values": self.pixel_values,
            "image_grid_thw": self.image_grid_thw,
            "pixel_values_videos": self.pixel_values_videos,
            "video_grid_thw": self.video_grid_thw,
        }
        return {name: value for name, value in given.items() if value is not None}

    def image_spans(self) -> list[tuple[int, int]]:
        """`[start, end)` of each image's `<|image_pad|>` run in the prompt, in prompt order."""
        return _runs(self.mm_token_type_ids[0], MM_IMAGE)

    def video_spans(self) -> list[tuple[int, int]]:
        """`[start, end)` of each video in the prompt, from its first frame pair's `<|video_pad|>` run
        to its last one's (the timestamps and vision markers between them inside), in prompt order."""
        runs = _runs(self.mm_token_type_ids[0], MM_VIDEO)
        frames = [] if self.video_grid_thw is None else self.video_grid_thw[:, 0].tolist()
        ends = np.cumsum(frames).tolist()
        return [(runs[end - t][0], runs[end - 1][1]) for t, end in zip(frames, ends)]

    def image_pixels(self, index: int) -> torch.Tensor:
        """The `pixel_values` rows of image `index` `(patches_i, C * T * P * P)`."""
        return _rows(self.pixel_values, self.image_grid_thw, index)

    def video_pixels(self, index: int) -> torch.Tensor:
        """The `pixel_values_videos` rows of video `index` `(patches_i, C * T * P * P)`."""
        return _rows(self.pixel_values_videos, self.video_grid_thw, index)

    def tail(self, start: int) -> PreparedInputs:
        """The prompt from token `start` on, with only the images and videos inside it; `start`
        must not cut one."""
        images, videos = self.image_spans(), self.video_spans()
        if any(s < start < e for s, e in images + videos):
            raise ValueError(f"token {start} is inside an image or a video")
        first_image = sum(1 for _, e in images if e <= start)
        first_video = sum(1 for _, e in videos if e <= start)
        pixel_values, image_grid_thw = _from(self.pixel_values, self.image_grid_thw, first_image)
        pixel_values_videos, video_grid_thw = _from(self.pixel_values_videos, self.video_grid_thw, first_video)
        return replace(
            self,
            input_ids=self.input_ids[:, start:],
            mm_token_type_ids=self.mm_token_type_ids[:, start:],
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            image_tokens=self.image_tokens[first_image:],
            pixel_values_videos=pixel_values_videos,
            video_grid_thw=video_grid_thw,
            video_tokens=self.video_tokens[first_video:],
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


class Processor:
    """Chat template + tokenizer + image processor of one checkpoint."""

    def __init__(self, path: str | Path, max_context: int) -> None:
        from transformers import AutoProcessor

        try:
            self.hf = AutoProcessor.from_pretrained(str(path))
        except (OSError, ValueError) as exc:
            raise BundleError(f"cannot load the processor from {path}: {exc}") from exc
        self.tokenizer = self.hf.tokenizer
        self.image_token_id: int = int(self.hf.image_token_id)
        self.video_token_id: int = int(self.hf.video_token_id)
        self.eos_token_ids: tuple[int, ...] = _eos_ids(Path(path), self.tokenizer)
        self.max_context = max_context
        self.opens_thinking = opens_thinking(self.render((Message("user", "?"),)))  # a Thinking template
        self.takes_videos = self.hf.video_processor is not None and self._places_videos()

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
        images = [to_rgb(img) for m in messages for img in m.images]
        videos = [video for m in messages for video in m.videos]
        pixel_values = image_grid_thw = pixel_values_videos = video_grid_thw = None
        pads: list[int] = []
        placeholders: list[str] = []
        video_tokens: list[int] = []
        if images:
            batch = self.hf.image_processor(images=images, return_tensors="pt", size=self.image_size(max_image_tokens))
            pixel_values, image_grid_thw = batch["pixel_values"], batch["image_grid_thw"]
            pads = (image_grid_thw.prod(-1) // self.hf.image_processor.merge_size**2).tolist()
        if videos:
            pixel_values_videos, video_grid_thw, placeholders = self._videos(videos, max_video_tokens)
            video_tokens = (video_grid_thw.prod(-1) // self.hf.video_processor.merge_size**2).tolist()
        ids = self._tokenize(messages, pads, placeholders)
        if ids.shape[1] >= self.max_context:
            raise UserError(
                f"the prompt is {ids.shape[1]} tokens, the model's context is {self.max_context}: "
                "shorten it or start a new conversation"
            )
        types = np.where(ids == self.image_token_id, MM_IMAGE, np.where(ids == self.video_token_id, MM_VIDEO, MM_TEXT))
        return PreparedInputs(
            input_ids=ids,
            mm_token_type_ids=types.astype(np.int64),
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            image_tokens=tuple(pads),
            pixel_values_videos=pixel_values_videos,
            video_grid_thw=video_grid_thw,
            video_tokens=tuple(video_tokens),
        )

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

    def _videos(self, videos: list[Video], max_video_tokens: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """`pixel_values_videos`, `video_grid_thw` and each video's placeholder text (per frame
        pair: its timestamp, then its `<|video_pad|>` tokens between vision markers)."""
        if not self.takes_videos:
            raise UserError("this model's chat template has no place for a video: ask about pictures instead")
        metadata = [
            _metadata(v.total_num_frames, v.fps, v.frames.shape[2], v.frames.shape[1], list(v.frames_indices))
            for v in videos
        ]
        batch = self.hf.video_processor(
            videos=[v.frames for v in videos],
            video_metadata=metadata,
            do_sample_frames=False,
            return_metadata=True,
            size=self.video_size(max_video_tokens),
            cap_pixels_per_frame=False,
            return_tensors="pt",
        )
        placeholders = [self.hf.replace_video_token(batch, i) for i in range(len(videos))]
        return batch["pixel_values_videos"], batch["video_grid_thw"], placeholders

    def _places_videos(self) -> bool:
        """Whether the chat template renders a video item (the demo model's, for one, does not)."""
        probe = {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "?"}]}
        rendered = self.hf.apply_chat_template([probe], tokenize=False, add_generation_prompt=True)
        return self.hf.video_token in rendered

    def _tokenize(self, messages: tuple[Message, ...], pads: list[int], videos: list[str]) -> np.ndarray:
        """The template is rendered around sentinels; template pieces are tokenized with special
        tokens (each image placeholder expanded to its patch count, each video's to its text),
        message texts without."""
        marked = tuple(
            replace(m, text=f"{_SENTINEL_OPEN}{i}{_SENTINEL_CLOSE}" if m.text else "") for i, m in enumerate(messages)
        )
        pieces = _SENTINEL.split(self.render(marked))
        image, video = self.hf.image_token, self.hf.video_token
        placeholder = re.compile(f"{re.escape(image)}|{re.escape(video)}")
        counts, texts = iter(pads), iter(videos)

        def expand(match: re.Match) -> str:
            return image * next(counts) if match.group() == image else next(texts)

        ids: list[int] = []
        for k, piece in enumerate(pieces):
            if k % 2:
                text, split = messages[int(piece)].text, True
            else:
                text, split = placeholder.sub(expand, piece), False
            ids += self.tokenizer(text, add_special_tokens=False, split_special_tokens=split)["input_ids"]
        for kind, left in (("image", counts), ("video", texts)):
            if next(left, None) is not None:
                raise UserError(f"the chat template did not place every {kind}; the checkpoint's template is unusual")
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
