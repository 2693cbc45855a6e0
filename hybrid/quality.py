"""`python -m hybrid quality`: what each INT4 setting of the decoder costs in fidelity, beside its speed.

For a checkpoint, the text decoder is exported once in fp32 and once per INT4 setting (cached). The
fp32 decoder answers a few chat prompts greedily; that answer is the reference sequence. Each
setting then reads the same sequences teacher-forced and is compared position by position with the
fp32 logits: top-1 agreement and the mean KL divergence KL(fp32 || int4). With `--int8-prefill`,
each setting has a second row whose prompt passes run the int8 graph derived from it
(`hybrid.export.prefill`), as INT4 bundles do by default: the prompt's keys and values and the first
logits come from it, every later position from the INT4 decoder. Each setting also answers
greedily on its own: the share of answers equal to fp32's, and the mean share of their tokens
before the first divergence. Decode speed is the median time of a one-token step, all settings
timed in turns in one process (this machine is noisy). With `--demo-eval N`, a bundle per setting
also answers N demo questions (`hybrid.demo.eval`), the measure that weighs most: random weights
have no outliers and flatter coarse settings.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from hybrid.decoder import KVCache, OnnxDecoder
from hybrid.errors import UserError
from hybrid.export.int4 import QUANTIZERS, Int4Scheme, Int4Setting
from hybrid.layout import PREFILL_GRAPH
from hybrid.threads import physical_cores

log = logging.getLogger(__name__)

FP32 = "fp32"
PROMPTS = (
    "Describe a sunny morning in a small town.",
    "What is the capital of France, and why is it famous?",
    "Write three short tips for learning to cook.",
    "Explain what a neural network is to a child.",
    "List five colours and one thing of each colour.",
    "How do I sort a list of numbers in Python?",
    "Tell me a short story about a cat and a boat.",
    "What are the planets of the solar system?",
)


INT8_PREFILL = "+int8-prefill"  # a row's name suffix: its prompt passes run the int8 graph


@dataclass(frozen=True)
class Candidate:
    """A decoder to grade: its graph, the embedding table, and the prompt pass's graph (None: its own)."""

    path: Path
    embed: Path
    prompt: Path | None = None


@dataclass(frozen=True)
class SettingQuality:
    """One decoder's figures against fp32's on the same prompts."""

    setting: str
    weight_mb: float  # the decoder's weights: what a decode step reads
    step_ms: float  # median one-token decode step
    top1: float  # teacher-forced next-token agreement with fp32
    kl: float  # mean KL(fp32 || this), nats
    greedy_equal: float  # share of greedy answers equal to fp32's
    greedy_prefix: float  # mean share of an answer's tokens before it departs from fp32's
    demo: dict[str, float] | None = None  # demo eval accuracy per kind

    @property
    def tokens_per_s(self) -> float:
        return 1e3 / self.step_ms if self.step_ms else 0.0


def add_quality_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder")
    parser.add_argument(
        "--settings",
        default="rtn-b32,mse-b32,mse-zp-b32,mse-zp-b64+head-mse-zp-b32,mse-zp-b64,rtn-b64,mse-zp-b128",
        help="comma-separated INT4 settings QUANTIZER-bBLOCK, each optionally +head-QUANTIZER-bBLOCK "
        f"(quantizers: {', '.join(QUANTIZERS)})",
    )
    parser.add_argument("--head", default=None, help="the LM head's setting for all (default: each setting's own)")
    parser.add_argument("--new-tokens", type=int, default=48, help="tokens per reference answer")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"prompts (at most {len(PROMPTS)})")
    parser.add_argument("--demo-eval", type=int, default=0, help="demo questions per setting (a demo model only)")
    parser.add_argument(
        "--int8-prefill", action="store_true", help="also grade each setting with its int8 prompt pass (a row each)"
    )
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--cache", default=".cache/quality", help="where the exported decoders are kept")
    parser.add_argument("--json", action="store_true")


def run_quality(args: argparse.Namespace) -> int:
    if not 1 <= args.prompts <= len(PROMPTS) or args.new_tokens < 2:
        raise UserError(f"--prompts must be in [1, {len(PROMPTS)}] and --new-tokens at least 2")
    head = Int4Setting.parse(args.head) if args.head else None
    schemes = {}
    for name in args.settings.split(","):
        scheme = Int4Scheme.parse(name)
        scheme = Int4Scheme(scheme.layers, head) if head else scheme
        schemes[scheme.name] = scheme
    checkpoint = Path(args.model).resolve()
    if not (checkpoint / "config.json").is_file():
        raise UserError(f"{checkpoint} is not a checkpoint folder (no config.json)")
    work = Path(args.cache) / hashlib.sha256(str(checkpoint).encode()).hexdigest()[:12]
    decoders = _export_decoders(checkpoint, work, schemes, args.int8_prefill)
    results = measure(
        decoders, _prompt_ids(checkpoint, args.prompts), args.new_tokens, args.threads or physical_cores()
    )
    if args.demo_eval:
        for name, scheme in [(FP32, None), *schemes.items()]:
            for row in (name, name + INT8_PREFILL) if scheme and args.int8_prefill else (name,):
                results[row] = _with_demo_eval(results[row], checkpoint, work, scheme, args.demo_eval)
    report = {
        "model": str(checkpoint),
        "new_tokens": args.new_tokens,
        "prompts": args.prompts,
        "settings": [asdict(r) | {"tokens_per_s": r.tokens_per_s} for r in results.values()],
    }
    print(json.dumps(report, indent=2) if args.json else table(list(results.values())))
    return 0


def _export_decoders(
    checkpoint: Path, work: Path, schemes: dict[str, Int4Scheme], int8_prefill: bool = False
) -> dict[str, Candidate]:
    """The fp32 decoder and each scheme's (and with `int8_prefill`, each scheme's again with its int8
    prompt pass), exported unless already in `work`."""
    from transformers import AutoConfig

    from hybrid.export import decoder
    from hybrid.export.prefill import write_int8_prefill
    from hybrid.export.tensors import CheckpointTensors, write_npy

    config = AutoConfig.from_pretrained(str(checkpoint))
    tensors = CheckpointTensors(checkpoint)
    embed = work / "embeddings.npy"
    if not embed.is_file():
        work.mkdir(parents=True, exist_ok=True)
        name = decoder.TEXT + "embed_tokens.weight"
        write_npy(embed, tensors.shape(name), lambda rows: tensors.read(name, rows))
    paths = {}
    for name, scheme in [(FP32, None), *schemes.items()]:
        path = work / name.replace("+", "_") / "decoder.onnx"
        done = path.with_name("done")
        if not done.is_file():
            start = time.perf_counter()
            precision = FP32 if scheme is None else "int4"
            decoder.export_decoder(tensors, config, path, precision, int4=scheme or Int4Scheme())
            done.write_text("")
            log.info("exported the %s decoder in %.0f s", name, time.perf_counter() - start)
        paths[name] = Candidate(path, embed)
        if scheme is not None and int8_prefill:
            prompt = path.with_name(PREFILL_GRAPH)
            prompt_done = path.with_name("done-" + PREFILL_GRAPH)
            if not prompt_done.is_file():
                write_int8_prefill(path, prompt)
                prompt_done.write_text("")
            paths[name + INT8_PREFILL] = Candidate(path, embed, prompt)
    return paths


def _prompt_ids(checkpoint: Path, count: int) -> list[np.ndarray]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    prompts = []
    for text in PROMPTS[:count]:
        chat = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        prompts.append(np.array(tokenizer(chat, add_special_tokens=False)["input_ids"], dtype=np.int64))
    return prompts


def measure(
    decoders: dict[str, Candidate], prompts: list[np.ndarray], new_tokens: int, threads: int
) -> dict[str, SettingQuality]:
    """Every decoder against the first one (fp32), as the module docstring says."""
    embed = np.load(next(iter(decoders.values())).embed, mmap_mode="r")
    loaded = {name: OnnxDecoder(d.path, threads, d.prompt) for name, d in decoders.items()}
    steps: dict[str, list[float]] = {name: [] for name in loaded}
    greedy: dict[str, list[np.ndarray]] = {name: [] for name in loaded}
    for ids in prompts:  # settings in turns, so that a noisy moment hits all of them
        for name, dec in loaded.items():
            tokens, times = _greedy(dec, embed, ids, new_tokens)
            greedy[name].append(tokens)
            steps[name] += times
    answers = greedy[FP32]  # the reference sequences
    ref_logits = [_forced(loaded[FP32], embed, ids, answer) for ids, answer in zip(prompts, answers)]
    results = {}
    for name, dec in loaded.items():
        logits = ref_logits if name == FP32 else [_forced(dec, embed, ids, a) for ids, a in zip(prompts, answers)]
        top1, kl = _agreement(ref_logits, logits)
        equal = [np.array_equal(a, b) for a, b in zip(answers, greedy[name])]
        prefix = [_common_prefix(a, b) / len(a) for a, b in zip(answers, greedy[name])]
        path = decoders[name].path
        results[name] = SettingQuality(
            setting=name,
            weight_mb=round(path.with_name(path.name + ".data").stat().st_size / 2**20, 3),
            step_ms=round(1e3 * float(np.median(steps[name])), 4),
            top1=round(top1, 4),
            kl=round(kl, 5),
            greedy_equal=round(float(np.mean(equal)), 3),
            greedy_prefix=round(float(np.mean(prefix)), 3),
        )
    return results


def _prefill(dec: OnnxDecoder, embed: np.ndarray, ids: np.ndarray, capacity: int) -> tuple[KVCache, np.ndarray]:
    cache = dec.new_cache(capacity)
    positions = np.broadcast_to(np.arange(len(ids))[None, None], (3, 1, len(ids))).copy()
    no_deepstack = np.zeros((dec.num_deepstack, 1, len(ids), dec.hidden_size), dtype=np.float32)
    logits = dec.forward(cache, np.asarray(embed[ids], dtype=np.float32)[None], positions, no_deepstack)
    return cache, logits


def _greedy(dec: OnnxDecoder, embed: np.ndarray, ids: np.ndarray, new_tokens: int) -> tuple[np.ndarray, list[float]]:
    """`new_tokens` greedy tokens (no stopping: the comparison wants equal lengths) and each step's seconds."""
    cache, logits = _prefill(dec, embed, ids, len(ids) + new_tokens)
    tokens, times = [int(np.argmax(logits))], []
    for _ in range(new_tokens - 1):
        start = time.perf_counter()
        logits = dec.step(cache, embed[tokens[-1]], cache.length)
        times.append(time.perf_counter() - start)
        tokens.append(int(np.argmax(logits)))
    return np.array(tokens), times


def _forced(dec: OnnxDecoder, embed: np.ndarray, ids: np.ndarray, answer: np.ndarray) -> np.ndarray:
    """Logits `(len(answer), V)` that predict each token of `answer`, the previous ones fed."""
    cache, logits = _prefill(dec, embed, ids, len(ids) + len(answer))
    rows = [logits]
    for token in answer[:-1]:
        rows.append(dec.step(cache, embed[token], cache.length).copy())
    return np.stack(rows)


def _agreement(reference: list[np.ndarray], other: list[np.ndarray]) -> tuple[float, float]:
    """Top-1 agreement and mean KL(reference || other) over every position."""
    ref, oth = np.concatenate(reference).astype(np.float64), np.concatenate(other).astype(np.float64)
    top1 = float(np.mean(ref.argmax(-1) == oth.argmax(-1)))
    log_p = ref - _logsumexp(ref)
    log_q = oth - _logsumexp(oth)
    kl = float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)))
    return top1, kl


def _logsumexp(x: np.ndarray) -> np.ndarray:
    peak = x.max(axis=-1, keepdims=True)
    return peak + np.log(np.exp(x - peak).sum(axis=-1, keepdims=True))


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    differ = np.flatnonzero(a != b)
    return int(differ[0]) if differ.size else len(a)


def _with_demo_eval(
    result: SettingQuality, checkpoint: Path, work: Path, scheme: Int4Scheme | None, n: int
) -> SettingQuality:
    """`result` with the demo eval's accuracy per kind, from a bundle of `scheme` (None: fp32), hybrid route."""
    from hybrid.config import RuntimeConfig
    from hybrid.demo.eval import eval_exchanges, evaluate, pipeline_answerer
    from hybrid.export.bundle import export_bundle
    from hybrid.pipeline import Pipeline

    bundle = work / "bundles" / (FP32 if scheme is None else scheme.name.replace("+", "_"))
    if not bundle.is_dir():
        export_bundle(
            str(checkpoint), bundle, FP32 if scheme is None else "int4", genai=False, int4=scheme or Int4Scheme()
        )
    runtime = RuntimeConfig(prefill="int8" if result.setting.endswith(INT8_PREFILL) else "decoder")
    pipeline = Pipeline.load(bundle, runtime, verify=False, only=("hybrid",))
    report = evaluate(pipeline_answerer(pipeline, "hybrid"), eval_exchanges(n, seed=1234, text=False))
    demo = {kind: round(score.accuracy, 3) for kind, score in report.asked.items()}
    return SettingQuality(**{**asdict(result), "demo": demo})


def table(results: list[SettingQuality]) -> str:
    kinds = sorted({k for r in results for k in (r.demo or {})})
    head = f"{'setting':24s} {'weights MB':>10s} {'tok/s':>7s} {'top-1':>6s} {'KL':>8s} {'greedy=':>7s} {'prefix':>6s}"
    lines = [head + "".join(f" {k[:10]:>10s}" for k in kinds)]
    for r in results:
        line = (
            f"{r.setting:24s} {r.weight_mb:10.1f} {r.tokens_per_s:7.2f} {r.top1:6.3f} {r.kl:8.5f} "
            f"{r.greedy_equal:7.2f} {r.greedy_prefix:6.2f}"
        )
        lines.append(line + "".join(f" {(r.demo or {}).get(k, float('nan')):10.2f}" for k in kinds))
    return "\n".join(lines)
