"""A route that cannot load fails alone: a bundle whose GenAI folder is broken still serves the
hybrid and PyTorch routes, in the pipeline, the CLI and the page, and each says why GenAI is missing."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from hybrid.__main__ import main as cli_main
from hybrid.errors import BundleError, RouteError
from hybrid.launch import describe
from hybrid.pipeline import Pipeline
from tests.conftest import draw_scene
from tests.helpers import ask, run
from tests.page import chat_updates, last, make_service
from web.page import UNAVAILABLE, header, route_choices

REFUSED = "cannot load the GenAI model"  # what GenAI says of a tokenizer it cannot parse


@pytest.fixture(scope="module")
def broken(bundle, tmp_path_factory):
    """The base bundle with a GenAI tokenizer that GenAI cannot parse (the HF processor's is intact)."""
    target = tmp_path_factory.mktemp("broken-genai") / "bundle"
    shutil.copytree(bundle("base"), target)
    (target / "genai" / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    return target


@pytest.fixture(scope="module")
def loaded(broken) -> Pipeline:
    return Pipeline.load(broken, verify=False)  # GenAI itself refuses the folder, not our checksums


def test_the_other_routes_load_and_genai_says_why_not(loaded):
    assert set(loaded.routes) == {"hybrid", "pytorch"}
    assert REFUSED in loaded.unavailable["genai"] and "parse error" in loaded.unavailable["genai"]
    text = ask("Hello! What is 3 plus 4?")
    assert loaded.plan(text, "auto") == ("hybrid",), "auto falls back to the hybrid route for text"
    assert loaded.plan(text, "compare") == ("pytorch", "hybrid")
    with pytest.raises(RouteError, match=f"the genai route is unavailable: {REFUSED}"):
        loaded.plan(text, "genai")
    with pytest.raises(RouteError, match="the genai route is unavailable"):
        run(loaded, text, "genai")
    answer = run(loaded, text, "hybrid")
    assert answer["token_ids"] == run(loaded, text, "pytorch")["token_ids"]
    image = ask("What is this?", [draw_scene((64, 64), (200, 30, 30))])
    assert loaded.plan(image, "auto") == ("hybrid",)


def test_verification_names_the_broken_file_and_keeps_the_others(broken):
    verified = Pipeline.load(broken)
    assert set(verified.routes) == {"hybrid", "pytorch"}
    assert "genai/tokenizer.json is corrupted" in verified.unavailable["genai"]


def test_a_bundle_without_genai_says_how_to_get_it(bundle, tmp_path):
    target = tmp_path / "bundle"
    shutil.copytree(bundle("base"), target, ignore=shutil.ignore_patterns("genai"))
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["parts"] = {k: v for k, v in manifest["parts"].items() if not k.startswith("genai/")}
    (target / "manifest.json").write_text(json.dumps(manifest))
    pipeline = Pipeline.load(target)
    assert "no GenAI model" in pipeline.unavailable["genai"] and "--no-genai" in pipeline.unavailable["genai"]


def test_no_route_loading_is_an_error_that_names_each_reason(broken):
    with pytest.raises(BundleError, match="no route .* could load .*genai: .*" + REFUSED):
        Pipeline.load(broken, verify=False, only=("genai",))


def test_the_cli_says_which_route_is_missing_and_why(broken, capsys, caplog):
    argv = ["generate", "--bundle", str(broken), "--prompt", "Hello!", "--max-new-tokens", "4", "--json"]
    assert cli_main([*argv, "--route", "genai"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: the genai route is unavailable:") and "tokenizer.json" in err[-1]
    with caplog.at_level(logging.WARNING, logger="hybrid"):
        assert cli_main(argv) == 0
    assert json.loads(capsys.readouterr().out)["route"] == "hybrid"
    assert "the genai route is unavailable: " in caplog.text and "tokenizer.json" in caplog.text
    assert cli_main([*argv, "--route", "compare"]) == 0
    assert [json.loads(line)["route"] for line in capsys.readouterr().out.splitlines()] == ["pytorch", "hybrid"]


def test_the_page_shows_genai_unavailable_and_compare_skips_it(loaded):
    choices = dict((value, label) for label, value in route_choices(describe(loaded)))
    assert choices["genai"] == "GenAI" + UNAVAILABLE and choices["hybrid"] == "Hybrid ONNX"
    assert "GenAI is unavailable" in header(describe(loaded)) and REFUSED in header(describe(loaded))
    updates = chat_updates(
        make_service(loaded), {"text": "Hello!", "files": []}, route="compare", sampling=(6.0, 0.0, 1.0, 0.0, 1.0, 0.0)
    )
    assert last(updates, "latency")["route"].tolist() == ["pytorch", "hybrid"]
