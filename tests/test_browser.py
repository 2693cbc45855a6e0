"""End to end in headless Chromium (Debian's, driven by Playwright): upload an example picture,
ask about it, wait for the streamed answer and the latency table, download the conversation, retry
the answer and undo the question; then ask a grounding example on every route and see their boxes
drawn on the picture.

Set SAVE_SCREENSHOT=path to keep a copy of the final page there (e.g. assets/screenshot.png).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from hybrid.launch import describe
from hybrid.pipeline import Pipeline
from tests.helpers import free_port
from web.page import EXAMPLES, EXAMPLES_DIR, build_demo, launch_demo

pytestmark = pytest.mark.slow  # exports the demo model and drives Chromium

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 120_000  # generous: the machine may be busy; every wait is on a condition


expect.set_options(timeout=TIMEOUT_MS)


@pytest.fixture(scope="module")
def served(demo_bundle) -> Pipeline:
    """The demo model the app serves by default: it answers the example questions."""
    return Pipeline.load(demo_bundle("fp32"))


@pytest.fixture(scope="module")
def url(served):
    demo = build_demo(served, describe(served))
    launch_demo(demo, server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        yield demo.local_url
    finally:
        demo.close()


def test_image_question_streams_an_answer_then_an_example_compares_routes(url, tmp_path):
    assert Path(CHROMIUM).is_file(), "install Debian's chromium: apt-get install -y chromium"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            ask_about_example(page)
            wait_for_answer(page)
            download_conversation(page)
            retry_then_undo(page)
            compare_on_an_example(page)
            follow_up_while_answering(page)
            screenshot = tmp_path / "app.png"
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    assert screenshot.stat().st_size > 10_000
    if target := os.environ.get("SAVE_SCREENSHOT"):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(screenshot, target)


def ask_about_example(page) -> None:
    name, question = EXAMPLES[2]
    page.locator("#prompt input[type=file]").set_input_files(str(EXAMPLES_DIR / name))
    expect(page.locator("#prompt img")).to_have_count(1)  # the thumbnail: the upload is done
    textbox = page.locator("#prompt textarea")
    textbox.fill(question)
    textbox.press("Enter")


def wait_for_answer(page) -> None:
    chat = page.locator("#chatbot")
    expect(chat.locator("img")).to_have_count(1)  # the question bubble shows the picture
    mark = chat.locator(".route-mark").last
    expect(mark).to_contain_text("tok/s")  # the answer is finished and names its route
    expect(mark).to_contain_text("hybrid")
    expect(page.locator("#latency")).to_contain_text("hybrid")
    expect(page.locator("#history")).to_contain_text(EXAMPLES[2][1])
    expect(page.locator("#stages")).to_contain_text("decode")  # the chart's legend: it has drawn


def download_conversation(page) -> None:
    """The download button gives the conversation so far as JSON: the question, and the answer's route."""
    with page.expect_download() as download:
        page.locator("#download").click()
    record = json.loads(Path(download.value.path()).read_text())
    assert download.value.suggested_filename == "conversation.json"
    assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
    assert record["messages"][0]["text"] == EXAMPLES[2][1] and record["messages"][1]["route"] == "hybrid"


def retry_then_undo(page) -> None:
    """The chat's own buttons: retry answers the question again (a second run), undo takes the
    question back into the textbox and leaves an empty conversation."""
    chat = page.locator("#chatbot")
    chat.get_by_label("Retry").last.click()
    expect(page.locator("#history [role=grid]")).to_have_attribute("aria-rowcount", "3")  # header + 2 runs
    expect(chat.locator(".route-mark")).to_have_count(1)  # the answer was replaced, not added
    expect(chat.locator(".route-mark").last).to_contain_text("tok/s")
    chat.get_by_label("Undo").last.click()
    expect(chat.locator(".route-mark")).to_have_count(0)
    expect(page.locator("#prompt textarea")).to_have_value(EXAMPLES[2][1])


def compare_on_an_example(page) -> None:
    """A new conversation from a clicked grounding example, answered by every route that sees
    images (PyTorch, then hybrid), one after the other, then both routes' boxes on the picture."""
    page.locator("#clear").click()
    expect(page.locator("#chatbot .route-mark")).to_have_count(0)
    page.locator("#route").get_by_label("Compare all").check()
    name, question = EXAMPLES[0]
    page.locator("#examples").get_by_text(question).click()
    expect(page.locator("#prompt img")).to_have_count(1)
    textbox = page.locator("#prompt textarea")
    expect(textbox).to_have_value(question)
    textbox.press("Enter")
    marks = page.locator("#chatbot .route-mark")
    expect(marks).to_have_count(2)
    expect(marks.nth(0)).to_contain_text("pytorch")
    expect(marks.nth(1)).to_contain_text("hybrid")
    expect(marks.nth(1)).to_contain_text("tok/s")
    expect(page.locator("#latency [role=grid]")).to_have_attribute("aria-rowcount", "3")  # header + 2 routes
    expect(page.locator("#latency")).to_contain_text("pytorch")
    expect(page.locator("#history [role=grid]")).to_have_attribute("aria-rowcount", "5")  # the runs stay
    figure = page.locator("#chatbot").get_by_text("Where the model looked")
    expect(figure).to_contain_text("PyTorch reference")
    expect(figure).to_contain_text("Hybrid ONNX")
    expect(page.locator("#chatbot img")).to_have_count(2)  # the question's picture and the one with boxes


def follow_up_while_answering(page) -> None:
    """A question sent with Enter while the last one is still being answered is not dropped: it is
    answered after it (every route again), and the textbox is emptied."""
    marks = page.locator("#chatbot .route-mark")
    before = marks.count()
    textbox = page.locator("#prompt textarea")
    textbox.fill("Locate every shape.")
    textbox.press("Enter")
    expect(marks).to_have_count(before + 1)  # the first route is answering
    textbox.fill("How many shapes are there?")
    textbox.press("Enter")
    expect(marks).to_have_count(before + 4)
    expect(marks.last).to_contain_text("tok/s")
    expect(page.locator("#chatbot")).to_contain_text("How many shapes are there?")
    expect(textbox).to_have_value("")
