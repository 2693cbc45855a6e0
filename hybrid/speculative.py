"""Speculative decoding with drafts from the conversation itself (prompt lookup), verified exactly.

`NgramDrafter` indexes the token ids of the sequence (the prompt and the answer so far): the longest
suffix of `MAX_NGRAM` down to `MIN_NGRAM` tokens that occurred before proposes the tokens that followed
its latest earlier occurrence. No second model, no training: Qwen3-VL's answers repeat much of what is
already in the conversation (grounding JSON, labels and colour words from the question, lists).

The decoder then runs the last token and k drafts in one pass (`OnnxDecoder.run_text`), and
`sampling.sample_against_draft` chooses each position's token from its logits as the plain loop would:
the drafts are kept up to the first one that is not the chosen token, so greedy tokens equal the plain
loop's, and sampled ones keep its distribution.

`DraftPolicy` decides k for each pass from how often drafts of each match length were kept (in this
answer, starting from the route's recent answers: `Acceptance`) and from what a pass of each size
costs on this machine and model (`PassCosts`, timed as answers go and kept by the route). It
verifies the k that promises the most tokens per second, which is 0 (a plain step) when drafts are
rarely right or a wider pass costs too much, so that an answer with nothing to match costs what the
plain loop costs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

MAX_NGRAM = 3  # the longest suffix looked up
MIN_NGRAM = 1  # the shortest: one token that occurred before
MAX_DRAFT = 8  # drafted tokens per verifying pass at most
GUESSED_SLOPE = 0.25  # the cost of each token a pass adds, relative to a one-token pass, until timed
FORGET = 0.95  # how fast old evidence about acceptance fades (per pass that drafted, or declined to)
ROUTE_FORGET = 0.995  # the same over the route's answers, per verifying pass
PRIOR_WEIGHT = 8.0  # passes the route's history counts for at the start of an answer


@dataclass(frozen=True)
class Draft:
    """Tokens proposed after the sequence, and how long the suffix that found them was."""

    tokens: list[int]
    match: int


class NgramDrafter:
    """Prompt-lookup drafts over a growing sequence of token ids."""

    def __init__(self, token_ids: Iterable[int] = ()) -> None:
        self.ids: list[int] = []
        self.follows: dict[tuple[int, ...], int] = {}  # n-gram -> where the token after its latest occurrence is
        self.extend(token_ids)

    def extend(self, token_ids: Iterable[int]) -> None:
        for token in token_ids:
            self.push(token)

    def push(self, token: int) -> None:
        """Append one token of the sequence; each n-gram ending just before it now points to it."""
        ids = self.ids
        ids.append(token)
        end = len(ids) - 1
        for n in range(MIN_NGRAM, min(MAX_NGRAM, end) + 1):
            self.follows[tuple(ids[end - n : end])] = end

    def propose(self, most: int = MAX_DRAFT) -> Draft:
        """Up to `most` tokens that followed the longest suffix of the sequence seen before (none
        when no suffix of `MIN_NGRAM` tokens or more occurred before)."""
        if most <= 0:
            return NO_DRAFT
        ids = self.ids
        for n in range(min(MAX_NGRAM, len(ids)), MIN_NGRAM - 1, -1):
            at = self.follows.get(tuple(ids[len(ids) - n :]))
            if at is not None:
                return Draft(ids[at : at + most], n)
        return NO_DRAFT


NO_DRAFT = Draft([], 0)


class PassCosts:
    """What a decoder pass of each size costs on this machine and model, timed as answers go: kept
    by the route across answers (it depends on the weights' shapes and the CPU, not on the text)."""

    def __init__(self) -> None:
        self.seconds: dict[int, float] = {}  # pass size -> its running mean time
        self.timed: dict[int, int] = {}  # pass size -> passes seen (the first of a size is not timed)

    def time(self, size: int, seconds: float) -> None:
        """A pass of `size` tokens took `seconds` (its first pass binds new buffers: not counted)."""
        count = self.timed[size] = self.timed.get(size, 0) + 1
        if count == 1:
            return
        mean = self.seconds.get(size)
        self.seconds[size] = seconds if mean is None else mean + (seconds - mean) / min(count - 1, 64)

    def cost(self, size: int) -> float:
        """A pass of `size` tokens, relative to a one-token pass: timed, or else guessed from the
        widest timed size (or `GUESSED_SLOPE` per token before any is)."""
        one = self.seconds.get(1)
        if one is not None and size in self.seconds:
            return self.seconds[size] / one
        widest = max((n for n in self.seconds if n > 1), default=None)
        if one is None or widest is None:
            slope = GUESSED_SLOPE
        else:
            slope = max(0.0, (self.seconds[widest] / one - 1.0) / (widest - 1))
        return 1.0 + slope * (size - 1)


class Acceptance:
    """How often drafts of each match length were kept, over the route's recent answers: the
    starting point of each answer's own estimate (the model and its kind of answers decide it)."""

    def __init__(self) -> None:
        self.kept = [0.0] * (MAX_NGRAM + 1)
        self.missed = [0.0] * (MAX_NGRAM + 1)

    def observe(self, match: int, kept: int, missed: bool) -> None:
        self.kept[match] = ROUTE_FORGET * self.kept[match] + kept
        self.missed[match] = ROUTE_FORGET * self.missed[match] + missed

    def prior(self, match: int) -> tuple[float, float]:
        """(kept, missed) worth at most `PRIOR_WEIGHT` passes, over a prior of one of each."""
        kept, missed = self.kept[match], self.missed[match]
        scale = min(1.0, PRIOR_WEIGHT / (kept + missed)) if kept + missed else 0.0
        return 1.0 + scale * kept, 1.0 + scale * missed


class DraftPolicy:
    """How many drafted tokens the next pass of one answer verifies: the count that promises the
    most tokens per second, from the answer's acceptance so far (starting from the route's recent
    answers') and the route's pass costs."""

    def __init__(self, costs: PassCosts, seen: Acceptance | None = None) -> None:
        self.costs = costs
        self.seen = seen if seen is not None else Acceptance()
        priors = [self.seen.prior(match) for match in range(MAX_NGRAM + 1)]
        self.kept = [kept for kept, _ in priors]  # per match length; with no history, one kept draft...
        self.missed = [missed for _, missed in priors]  # ...and one rejected (acceptance 0.5)

    def acceptance(self, match: int) -> float:
        """The chance that a draft found by a suffix of `match` tokens is kept, given the one before was."""
        return self.kept[match] / (self.kept[match] + self.missed[match])

    def choose(self, draft: Draft) -> int:
        """How many of `draft`'s tokens to verify (0: a plain step)."""
        if not draft.tokens:
            return 0
        accept, cost = self.acceptance(draft.match), self.costs.cost
        best, best_rate = 0, 1.0 / cost(1)
        expected, chance = 1.0, 1.0
        for k in range(1, len(draft.tokens) + 1):
            chance *= accept
            expected += chance  # tokens a pass of k drafts gives, on average
            rate = expected / cost(k + 1)
            if rate > best_rate:
                best, best_rate = k, rate
        if best == 0:  # declined: the evidence fades, so that drafting is tried again later
            self._forget(draft.match)
        return best

    def observe(self, match: int, drafted: int, kept: int) -> None:
        """After a pass that verified `drafted` tokens of a `match`-long suffix and kept `kept`."""
        self._forget(match)
        self.kept[match] += kept
        self.missed[match] += kept < drafted
        self.seen.observe(match, kept, kept < drafted)

    def _forget(self, match: int) -> None:
        for counts in (self.kept, self.missed):
            counts[match] = 1.0 + FORGET * (counts[match] - 1.0)
