"""Which route serves a request: `auto` sends any image or video to the hybrid route and text to GenAI (or
to the hybrid route when GenAI is unavailable); a route name forces that route; `compare` lists
every loaded route that can serve the request, the PyTorch reference first. A remote server is
asked only by name or in `compare`.
"""

from __future__ import annotations

from collections.abc import Mapping

from hybrid.errors import RouteError, UserError
from hybrid.types import ROUTE_NAMES, Request, RouteName

AUTO, COMPARE = "auto", "compare"
ROUTE_CHOICES: tuple[str, ...] = (AUTO, *ROUTE_NAMES, COMPARE)
REFERENCE: RouteName = "pytorch"  # the yardstick: Compare all runs it first
COMPARE_ORDER: tuple[RouteName, ...] = (REFERENCE, *(r for r in ROUTE_NAMES if r != REFERENCE))

NO_REMOTE = "no remote server was given: start with --remote URL"  # why "remote" may be missing


def choose_routes(
    request: Request,
    route: str,
    available: tuple[RouteName, ...],
    unavailable: Mapping[RouteName, str] | None = None,
) -> tuple[RouteName, ...]:
    """The routes that serve `request` for the choice `route`, among the loaded `available` ones;
    `unavailable` says why a route of the bundle did not load."""
    if route not in ROUTE_CHOICES:
        raise UserError(f"route must be one of {', '.join(ROUTE_CHOICES)}, got {route!r}")
    if route == COMPARE:
        return tuple(r for r in COMPARE_ORDER if r in available and can_serve(r, request))
    if route == AUTO:
        route = "hybrid" if _visual(request) or "genai" not in available else "genai"
    if route not in available:
        reason = (unavailable or {}).get(route)
        if reason is None and route == "remote":
            reason = NO_REMOTE
        raise RouteError(
            f"the {route} route is unavailable: {reason}" if reason else f"the {route} route is not loaded"
        )
    if not can_serve(route, request):
        served = "GenAI route serves text only" if route == "genai" else "remote route serves text and pictures"
        raise RouteError(f"the {served}: this conversation has {_visual(request)}; use auto or hybrid")
    return (route,)


def can_serve(route: RouteName, request: Request) -> bool:
    """Whether `route` can answer `request` at all: GenAI's model takes text only, the remote
    route text and pictures."""
    return not ((route == "genai" and _visual(request)) or (route == "remote" and request.has_videos))


def _visual(request: Request) -> str:
    """What in the conversation is not text ("an image", "a video"), or "" when nothing is."""
    return "an image" if request.has_images else "a video" if request.has_videos else ""
