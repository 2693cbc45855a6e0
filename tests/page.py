"""Drive the page's handlers without a browser: a `ChatService` wired to a built page, and its
updates read back by the names of the `Page` fields they set."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import gradio as gr

from app import ChatService, build_page


def make_service(pipeline, **kwargs) -> ChatService:
    """The service of a page built over `pipeline` (`stream_interval` 0: every chunk is an update)."""
    kwargs.setdefault("stream_interval", 0.0)
    _, service = build_page(pipeline, "", **kwargs)
    return service


def named(service: ChatService, update: dict) -> dict[str, Any]:
    """An update keyed by component, keyed instead by the name of its `Page` field."""
    names = {id(getattr(service.page, f.name)): f.name for f in fields(service.page)}
    return {names[id(component)]: value for component, value in update.items()}


def chat_updates(service: ChatService, message, turns=(), route="auto", sampling=(), history=(), name="s1",
                 detail: str | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """All the updates of one chat request, by field name."""
    extra = () if detail is None else (detail,)
    args = (message, list(turns), route, *sampling, list(history), session(name), *extra)
    return [named(service, update) for update in service.chat(*args)]


def session(name: str = "s1") -> gr.Request:
    return gr.Request(session_hash=name)


def last(updates: list[dict], key: str):
    """The latest value an update gave to the field `key`."""
    return [u[key] for u in updates if key in u][-1]
