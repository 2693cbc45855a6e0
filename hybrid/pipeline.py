"""A loaded bundle: the processor, then each route on its own (the hybrid route's vision tower,
embedding table and ONNX decoder; the GenAI model; the lazily loaded PyTorch reference), shared by
requests, and the KV caches kept for follow-ups (one budget over all conversations and routes).

A route that cannot load is left out with the reason, and the others serve: `routes` holds the
loaded ones, `unavailable` says why each other one did not load.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from hybrid.config import CheckpointSampling, Precisions, RuntimeConfig
from hybrid.conversation import ConversationStore
from hybrid.decoder import OnnxDecoder
from hybrid.errors import BundleError, HybridError, RouteError, UserError
from hybrid.injection import EmbeddingTable
from hybrid.layout import (
    DECODER_FILE,
    GENAI_DIR,
    PREFILL_FILE,
    PROCESSOR_DIR,
    SHARED_PARTS,
    VISION_DIR,
    route_parts,
    verify_parts,
)
from hybrid.manifest import Manifest
from hybrid.media import MEDIA
from hybrid.processor import Processor
from hybrid.router import NO_REMOTE, choose_routes
from hybrid.routes.genai import GenAIRoute
from hybrid.routes.hybrid import HybridRoute
from hybrid.routes.pytorch import PyTorchRoute
from hybrid.routes.remote import RemoteConfig, RemoteRoute
from hybrid.types import LOCAL_ROUTES, Chunk, Request, Route, RouteName, Video
from hybrid.vision import VisionTower

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Loader:
    """What every route is built from: the bundle, its manifest, the shared processor and caches."""

    bundle: Path
    manifest: Manifest
    runtime: RuntimeConfig
    processor: Processor
    conversations: ConversationStore
    remote_config: RemoteConfig | None = None

    def hybrid(self) -> Route:
        return HybridRoute(
            self.processor,
            VisionTower(
                self.bundle / VISION_DIR,
                self.runtime.threads,
                int8=Precisions.of(self.manifest.precision).vision_int8,
                backend=self.runtime.vision_backend,
                checkpoint=self.manifest.checkpoint,
            ),
            EmbeddingTable.of_bundle(self.bundle),
            OnnxDecoder(self.bundle / DECODER_FILE, self.runtime.threads, self.prompt_graph()),
            self.conversations,
        )

    def prompt_graph(self) -> Path | None:
        """The int8 prompt pass's graph, unless the bundle has none or the runtime asks for the decoder's."""
        if Precisions.of(self.manifest.precision).prompt != "int8" or self.runtime.prefill == "decoder":
            return None
        return self.bundle / PREFILL_FILE

    def genai(self) -> Route:
        if not (self.bundle / GENAI_DIR).is_dir():
            raise BundleError("this bundle has no GenAI model: export it without --no-genai")
        return GenAIRoute(self.bundle / GENAI_DIR, self.processor, self.conversations, self.runtime.threads)

    def pytorch(self) -> Route:
        return PyTorchRoute(self.manifest.checkpoint, self.processor, self.runtime.threads)

    def remote(self) -> Route:
        if self.remote_config is None:
            raise RouteError(NO_REMOTE)
        return RemoteRoute(self.remote_config)


@dataclass
class Pipeline:
    bundle: Path
    manifest: Manifest
    runtime: RuntimeConfig
    conversations: ConversationStore
    processor: Processor  # shared by the routes: prompts, images and videos in
    routes: dict[RouteName, Route] = field(default_factory=dict)
    unavailable: dict[RouteName, str] = field(default_factory=dict)  # route -> why it did not load
    verified: set[str] = field(default_factory=set)  # bundle files whose checksums were checked at load
    sampling: CheckpointSampling = field(default_factory=CheckpointSampling)  # the checkpoint's own
    opens_thinking: bool = False  # a Thinking template: replies start inside `<think>`
    load_seconds: float = 0.0

    @classmethod
    def load(
        cls,
        bundle: str | Path,
        runtime: RuntimeConfig = RuntimeConfig(),
        verify: bool = True,
        only: tuple[RouteName, ...] | None = None,
        remote: RemoteConfig | None = None,
    ) -> Pipeline:
        """Load the shared parts (a fault there stops everything), then each route of `only` (default:
        all the bundle's) on its own, and the route to `remote` if one is given; raises `BundleError`
        only when none of them loads."""
        start = time.perf_counter()
        bundle = Path(bundle)
        if not bundle.is_dir():
            raise BundleError(f"{bundle} is not a folder: make a bundle with `python -m hybrid export`")
        manifest = Manifest.load(bundle)
        if verify:
            verify_parts(bundle, manifest, SHARED_PARTS)
        max_context = int(manifest.model.get("max_position_embeddings", 32768))
        processor = Processor(bundle / PROCESSOR_DIR, max_context=max_context)
        conversations = ConversationStore(runtime.conversation_cache_mb)
        loader = _Loader(bundle, manifest, runtime, processor, conversations, remote)
        only = (only if only is not None else LOCAL_ROUTES) + (("remote",) if remote is not None else ())
        pipeline = cls(
            bundle=bundle,
            manifest=manifest,
            runtime=runtime,
            conversations=conversations,
            processor=processor,
            sampling=CheckpointSampling.read(bundle / PROCESSOR_DIR),
            opens_thinking=processor.opens_thinking,
        )
        for name in only:
            pipeline._load_route(name, getattr(loader, name), verify)
        if not pipeline.routes:
            reasons = "; ".join(f"{name}: {reason}" for name, reason in pipeline.unavailable.items())
            raise BundleError(f"no route of {bundle} could load ({reasons})")
        pipeline.load_seconds = time.perf_counter() - start
        log.info("loaded %s in %.1f s (routes: %s)", bundle, pipeline.load_seconds, ", ".join(pipeline.routes))
        return pipeline

    def _load_route(self, name: RouteName, build: Callable[[], Route], verify: bool) -> None:
        """Build one route, or record why it cannot serve; the other routes load regardless."""
        try:
            if verify:
                verify_parts(self.bundle, self.manifest, route_parts(name, self.bundle), self.verified)
            self.routes[name] = build()
        except HybridError as exc:
            self.unavailable[name] = str(exc)
        except Exception as exc:  # a runtime's own error type for a file it cannot read: report it, load the rest
            log.exception("the %s route failed to load", name)
            self.unavailable[name] = f"{type(exc).__name__}: {exc}"
        if name in self.unavailable:
            log.info("the %s route is unavailable: %s", name, self.unavailable[name])

    def check(self, request: Request) -> None:
        """Refuse requests outside the configured limits before any work is done."""
        if request.sampling.max_new_tokens > self.runtime.max_new_tokens_limit:
            raise UserError(
                f"max_new_tokens is {request.sampling.max_new_tokens}, the limit is {self.runtime.max_new_tokens_limit}"
            )
        for kind in MEDIA:
            self.runtime.check_count(kind, len(getattr(request, kind.items)))

    def open_video(self, source: str | Path | bytes) -> Video:
        """A video file's frames as the checkpoint samples them, within the runtime's video limits."""
        return self.processor.open_video(source, self.runtime.video)

    def plan(self, request: Request, route: str) -> tuple[RouteName, ...]:
        """The concrete routes that serve `route` ("auto" picks one, "compare" lists all that can)."""
        self.check(request)
        return choose_routes(request, route, tuple(self.routes), self.unavailable)

    def forget(self, conversation_id: str) -> None:
        """Drop the KV caches kept for that conversation (Clear, or the end of its session)."""
        dropped = self.conversations.forget(conversation_id)
        log.debug("dropped %d kept caches of conversation %s", dropped, conversation_id)

    def stream(self, request: Request, route: RouteName, cancel: threading.Event | None = None) -> Iterator[Chunk]:
        """Stream the answer of one concrete route (resolve "auto"/"compare" with `plan` first);
        a fault inside it is a `RouteError` (`_faults`)."""
        with self._faults(route):
            yield from self._route(route).stream(request, cancel)

    def warm(self, request: Request) -> int:
        """Encode and prefill, on the hybrid route, `request`'s prompt up to its last image or video,
        kept for the conversation's next request (`HybridRoute.warm`): the page does it when a
        picture is added, before its question is sent. Returns the tokens prefilled."""
        with self._faults("hybrid"):
            route = self._route("hybrid")
            assert isinstance(route, HybridRoute)
            return route.warm(request)

    def _route(self, route: RouteName) -> Route:
        if route not in self.routes:
            reason = self.unavailable.get(route)
            if reason:
                raise RouteError(f"the {route} route is unavailable: {reason}")
            raise RouteError(f"the {route} route is not loaded; loaded: {', '.join(self.routes)}")
        return self.routes[route]

    @contextmanager
    def _faults(self, route: RouteName) -> Iterator[None]:
        """A fault inside a route (not a user error) is logged with its traceback and re-raised as
        a `RouteError` naming the route, so one failing request never takes the server down."""
        try:
            yield
        except HybridError:
            raise
        except Exception as exc:  # a bug or a runtime fault in one route: report it, keep serving
            log.exception("the %s route failed", route)
            raise RouteError(f"the {route} route failed: {type(exc).__name__}: {exc}") from exc
