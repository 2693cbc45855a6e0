"""Drive the page's handlers without a browser: a `ChatService` wired to a built page, and its
updates read back by the names of the `Page` fields they set."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import gradio as gr

from hybrid.launch import describe
from web.page import build_page
from web.service import ChatService, Settings

# the sampling controls, in the order the tests give their values
SAMPLING = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed")


def make_service(pipeline, **kwargs) -> ChatService:
    """The service of a page built over `pipeline` (`stream_interval` 0: every chunk is an update)."""
    kwargs.setdefault("stream_interval", 0.0)
    _, service = build_page(pipeline, describe(pipeline), **kwargs)
    return service


def named(service: ChatService, update: dict) -> dict[str, Any]:
    """An update keyed by component, keyed instead by the name of its `Page` field."""
    names = {id(getattr(service.page, f.name)): f.name for f in fields(service.page)}
    return {names[id(component)]: value for component, value in update.items()}


def chat_updates(
    service: ChatService,
    message,
    turns=(),
    route="auto",
    sampling=(),
    history=(),
    name="s1",
    detail: str | None = None,
    host: str = "127.0.0.1",
) -> list[dict[str, Any]]:
    """All the updates of one chat request, by field name."""
    asked = service.chat(message, list(turns), settings(route, sampling, detail), list(history), session(name, host))
    return [named(service, update) for update in asked]


def settings(route: str = "auto", sampling=(), detail: str | None = None, greedy: bool = False) -> Settings:
    """The `Settings` the page reads from its controls: `sampling` values in `SAMPLING`'s order, as
    the sliders send them (floats)."""
    values = {"route": route, "greedy": greedy, **dict(zip(SAMPLING, sampling))}
    if detail is not None:
        values["image_detail"] = detail
    return Settings.read(values)


def session(name: str = "s1", host: str = "127.0.0.1") -> gr.Request:
    """A browser session `name` from the client address `host`."""
    return gr.Request(session_hash=name, client={"host": host, "port": 50000}, headers={})


def last(updates: list[dict], key: str):
    """The latest value an update gave to the field `key`."""
    return [u[key] for u in updates if key in u][-1]
