"""Which route serves a request: `auto` sends any image to the hybrid route and text to GenAI;
`hybrid`, `genai` and `pytorch` force one; `compare` lists every route that can serve it.
"""

from __future__ import annotations

from hybrid.errors import RouteError, UserError
from hybrid.types import Request

ROUTE_CHOICES = ("auto", "hybrid", "genai", "pytorch", "compare")
COMPARE_ORDER = ("pytorch", "hybrid", "genai")


def choose_routes(request: Request, route: str, available: tuple[str, ...]) -> tuple[str, ...]:
    if route not in ROUTE_CHOICES:
        raise UserError(f"route must be one of {', '.join(ROUTE_CHOICES)}, got {route!r}")
    if route == "compare":
        return tuple(r for r in COMPARE_ORDER if r in available and can_serve(r, request))
    if route == "auto":
        route = "hybrid" if request.has_images or "genai" not in available else "genai"
    if route not in available:
        raise RouteError(f"the {route} route is not in this bundle; export it with the GenAI model")
    if not can_serve(route, request):
        raise RouteError("the GenAI route serves text only: this conversation has an image; use auto or hybrid")
    return (route,)


def can_serve(route: str, request: Request) -> bool:
    return not (route == "genai" and request.has_images)
