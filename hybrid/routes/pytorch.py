"""The PyTorch reference route: plain `transformers` `generate` on the full checkpoint.

It is the yardstick for token parity and speed. The model is loaded on first use, since the other
routes never need it. `generate` runs in a worker thread that hands tokens over through a queue.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from hybrid.errors import BundleError
from hybrid.metrics import Stopwatch
from hybrid.processor import Processor
from hybrid.routes.common import Emitter, prepare
from hybrid.types import Chunk, Request, RouteName

log = logging.getLogger(__name__)
_DONE = object()


class PyTorchRoute:
    name: RouteName = "pytorch"

    def __init__(self, checkpoint: str | Path, processor: Processor, threads: int = 0) -> None:
        self.checkpoint = Path(checkpoint)
        if not (self.checkpoint / "config.json").is_file():
            raise BundleError(
                f"the PyTorch route needs the source checkpoint at {self.checkpoint}, which is missing; "
                "export the bundle again from a checkpoint on this machine"
            )
        self.processor = processor
        self.threads = threads
        self._model = None
        self._lock = threading.Lock()

    @property
    def model(self):
        with self._lock:
            if self._model is None:
                self._model = self._load()
        return self._model

    def _load(self):
        from transformers import Qwen3VLForConditionalGeneration
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # stderr is for the log and one-line errors
        log.info("loading the PyTorch reference model from %s", self.checkpoint)
        model = Qwen3VLForConditionalGeneration.from_pretrained(str(self.checkpoint), dtype=torch.float32)
        return model.eval()

    def stream(self, request: Request, cancel: threading.Event | None = None) -> Iterator[Chunk]:
        model = self.model
        if self.threads:
            torch.set_num_threads(self.threads)
        watch = Stopwatch()
        inputs = prepare(self.processor, request, watch)
        emitter = Emitter(self.name, self.processor, request.sampling, watch, cancel)
        tokens: queue.Queue = queue.Queue()
        stop_flag = threading.Event()
        worker = threading.Thread(
            target=self._generate, args=(model, inputs, request, watch, tokens, stop_flag), daemon=True
        )
        worker.start()
        try:
            yield from self._drain(tokens, emitter, watch)
        finally:
            stop_flag.set()
            worker.join()
        yield emitter.final()

    def _drain(self, tokens: queue.Queue, emitter: Emitter, watch: Stopwatch) -> Iterator[Chunk]:
        first = True
        while (item := tokens.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            if first:
                watch.add("prefill", time.perf_counter() - watch.start - sum(watch.stages.values()))
                first = False
            yield emitter.push(item)
            if emitter.done:
                return

    def _generate(self, model, inputs, request: Request, watch: Stopwatch, tokens: queue.Queue, stop_flag) -> None:
        from transformers import StoppingCriteria, StoppingCriteriaList

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), stop_flag.is_set(), dtype=torch.bool)

        s = request.sampling
        kwargs = dict(
            input_ids=torch.from_numpy(inputs.input_ids),
            attention_mask=torch.ones_like(torch.from_numpy(inputs.input_ids)),
            mm_token_type_ids=torch.from_numpy(inputs.mm_token_type_ids),
            max_new_tokens=s.max_new_tokens,
            min_new_tokens=s.min_new_tokens or None,
            do_sample=not s.greedy,
            repetition_penalty=s.repetition_penalty,
            eos_token_id=list(self.processor.eos_token_ids),
            pad_token_id=self.processor.eos_token_ids[0],
            streamer=_QueueStreamer(tokens),
            stopping_criteria=StoppingCriteriaList([_Stop()]),
        )
        if not s.greedy:
            kwargs.update(temperature=s.temperature, top_k=s.top_k or None, top_p=s.top_p)
        kwargs.update(inputs.vision_kwargs())
        hook = _VisionTimer(model.model.visual, watch)
        try:
            torch.manual_seed(s.seed)
            with torch.inference_mode():
                model.generate(**kwargs)
        except BaseException as exc:  # handed to the consumer thread, which re-raises it
            tokens.put(exc)
        finally:
            hook.remove()
            tokens.put(_DONE)


class _QueueStreamer:
    """`generate` streamer: skips the prompt, then puts each new token id on the queue."""

    def __init__(self, tokens: queue.Queue) -> None:
        self.tokens = tokens
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.tokens.put(int(token))

    def end(self) -> None:
        pass


class _VisionTimer:
    """Times the vision tower inside `generate` with forward hooks."""

    def __init__(self, visual: torch.nn.Module, watch: Stopwatch) -> None:
        self.watch = watch
        self.begin = 0.0
        self.handles = [
            visual.register_forward_pre_hook(self._pre),
            visual.register_forward_hook(self._post),
        ]

    def _pre(self, *args) -> None:
        self.begin = time.perf_counter()

    def _post(self, *args) -> None:
        self.watch.add("vision", time.perf_counter() - self.begin)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
