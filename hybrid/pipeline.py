"""A loaded bundle: the processor, the vision tower, the embedding table, the ONNX decoder, the
GenAI model and the (lazily loaded) PyTorch reference, each loaded once and shared by requests,
and the KV caches kept for follow-ups (one budget over all conversations and routes).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from hybrid.config import Manifest, RuntimeConfig
from hybrid.conversation import ConversationStore
from hybrid.errors import BundleError, HybridError, RouteError, UserError
from hybrid.export.bundle import DECODER_FILE, EMBED_FILE, GENAI_DIR, PROCESSOR_DIR, VISION_DIR, verify_bundle
from hybrid.types import Chunk, Request

log = logging.getLogger(__name__)


@dataclass
class Pipeline:
    bundle: Path
    manifest: Manifest
    runtime: RuntimeConfig
    conversations: ConversationStore
    routes: dict = field(default_factory=dict)
    load_seconds: float = 0.0

    @classmethod
    def load(
        cls,
        bundle: str | Path,
        runtime: RuntimeConfig = RuntimeConfig(),
        verify: bool = True,
        only: tuple[str, ...] = ("hybrid", "pytorch", "genai"),
    ) -> "Pipeline":
        from hybrid.decoder import OnnxDecoder
        from hybrid.injection import EmbeddingTable
        from hybrid.processor import Processor
        from hybrid.routes.hybrid import HybridRoute
        from hybrid.routes.pytorch import PyTorchRoute
        from hybrid.vision import VisionTower

        start = time.perf_counter()
        bundle = Path(bundle)
        if not bundle.is_dir():
            raise BundleError(f"{bundle} is not a folder: make a bundle with `python -m hybrid export`")
        manifest = Manifest.load(bundle)
        if verify:
            verify_bundle(bundle, manifest)
        max_context = int(manifest.model.get("max_position_embeddings", 32768))
        processor = Processor(bundle / PROCESSOR_DIR, max_context=max_context)
        conversations = ConversationStore(runtime.conversation_cache_mb)
        routes: dict = {}
        if "hybrid" in only:
            routes["hybrid"] = HybridRoute(
                processor,
                VisionTower(bundle / VISION_DIR, runtime.threads, int8=manifest.precision == "int4"),
                EmbeddingTable(bundle / EMBED_FILE),
                OnnxDecoder(bundle / DECODER_FILE, runtime.threads),
                conversations,
            )
        if "pytorch" in only:
            routes["pytorch"] = PyTorchRoute(manifest.checkpoint, processor, runtime.threads)
        if "genai" in only and (bundle / GENAI_DIR).is_dir():
            from hybrid.routes.genai import GenAIRoute

            routes["genai"] = GenAIRoute(bundle / GENAI_DIR, processor, conversations, runtime.threads)
        pipeline = cls(bundle=bundle, manifest=manifest, runtime=runtime, routes=routes, conversations=conversations)
        pipeline.load_seconds = time.perf_counter() - start
        log.info("loaded %s in %.1f s (routes: %s)", bundle, pipeline.load_seconds, ", ".join(routes))
        return pipeline

    def check(self, request: Request) -> None:
        """Refuse requests outside the configured limits before any work is done."""
        if request.sampling.max_new_tokens > self.runtime.max_new_tokens_limit:
            raise UserError(
                f"max_new_tokens is {request.sampling.max_new_tokens}, the limit is {self.runtime.max_new_tokens_limit}"
            )
        self.runtime.check_image_count(len(request.images))

    def plan(self, request: Request, route: str) -> tuple[str, ...]:
        """The concrete routes that serve `route` ("auto" picks one, "compare" lists all that can)."""
        from hybrid.router import choose_routes

        self.check(request)
        return choose_routes(request, route, tuple(self.routes))

    def forget(self, conversation_id: str) -> None:
        """Drop the KV caches kept for that conversation (Clear, or the end of its session)."""
        dropped = self.conversations.forget(conversation_id)
        log.debug("dropped %d kept caches of conversation %s", dropped, conversation_id)

    def stream(self, request: Request, route: str, cancel: threading.Event | None = None) -> Iterator[Chunk]:
        """Stream the answer of one concrete route (resolve "auto"/"compare" with `plan` first).

        A fault inside a route (not a user error) is logged with its traceback and re-raised as a
        `RouteError` naming the route, so one failing request never takes the server down."""
        if route not in self.routes:
            raise RouteError(f"the {route} route is not loaded; loaded: {', '.join(self.routes)}")
        try:
            yield from self.routes[route].stream(request, cancel)
        except HybridError:
            raise
        except Exception as exc:  # a bug or a runtime fault in one route: report it, keep serving
            log.exception("the %s route failed", route)
            raise RouteError(f"the {route} route failed: {type(exc).__name__}: {exc}") from exc
