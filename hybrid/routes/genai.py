"""The GenAI route: text-only conversations through onnxruntime-genai's own C++ generation loop.

Model and tokenizer are loaded once; each request gets a fresh `GeneratorParams`/`Generator`,
released when the request ends (also when it is cancelled). Prompt ids come from the same HF
processor as the other routes, so every route sees exactly the same tokens.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Iterator

from hybrid.decoder import physical_cores
from hybrid.errors import BundleError, RouteError
from hybrid.metrics import Stopwatch
from hybrid.processor import Processor
from hybrid.routes.common import Emitter, prepare
from hybrid.types import Chunk, Request


class GenAIRoute:
    name = "genai"

    def __init__(self, folder: str | Path, processor: Processor, threads: int = 0) -> None:
        try:
            import onnxruntime_genai as og
        except ImportError as exc:
            raise BundleError("the GenAI route needs onnxruntime-genai: pip install onnxruntime-genai") from exc
        self.og = og
        self.processor = processor
        try:
            config = og.Config(str(folder))
            # GenAI's default threading runs about 2x slower on a 2-core machine
            overlay = {"model": {"decoder": {"session_options": {"intra_op_num_threads": threads or physical_cores()}}}}
            config.overlay(json.dumps(overlay))
            self.model = og.Model(config)
            self.tokenizer = og.Tokenizer(self.model)
        except Exception as exc:  # GenAI raises RuntimeError/OSError subclasses for a bad folder
            raise BundleError(f"cannot load the GenAI model from {folder}: {exc}") from exc
        self.vocab_size = json.loads((Path(folder) / "genai_config.json").read_text())["model"]["vocab_size"]

    def stream(self, request: Request, cancel: threading.Event | None = None) -> Iterator[Chunk]:
        if request.has_images:
            raise RouteError("the GenAI route serves text only: this conversation has an image")
        watch = Stopwatch()
        inputs = prepare(self.processor, request, watch)
        emitter = Emitter(self.name, self.processor, request.sampling, watch, cancel)
        generator = self.og.Generator(self.model, self._params(request, inputs.num_tokens))
        try:
            start = time.perf_counter()
            generator.append_tokens(inputs.input_ids[0].tolist())
            watch.add("prefill", time.perf_counter() - start)
            while not emitter.done:
                if generator.is_done():  # GenAI stopped on an EOS id of its own config
                    emitter.finish("eos")
                    break
                generator.generate_next_token()
                yield emitter.push(int(generator.get_next_tokens()[0]))
        finally:
            del generator  # frees its KV cache now, not at the next garbage collection
        yield emitter.final()

    def _params(self, request: Request, prompt_tokens: int):
        s = request.sampling
        params = self.og.GeneratorParams(self.model)
        options = dict(
            max_length=prompt_tokens + s.max_new_tokens,
            min_length=prompt_tokens + s.min_new_tokens,
            do_sample=not s.greedy,
            repetition_penalty=s.repetition_penalty,
            random_seed=s.seed,
        )
        if not s.greedy:
            options.update(temperature=s.temperature, top_k=s.top_k or self.vocab_size, top_p=s.top_p)
        params.set_search_options(**options)
        return params
