"""Online choice, per batch size, of the fastest of several ways to compute the same product.

The Hessian operator has up to three ways to multiply a batch of b vectors (a vmapped double
backward, a vmapped forward-over-reverse, a loop of single products) and two for one vector;
which is fastest depends on the model, the machine and b (on 2 CPU cores a loop of double
backward products beat both batches at b = 8 and forward-over-reverse's batch beat it at
b = 16 on the bench MLP). Timing them on probe vectors before the first product costs
products nobody asked for (60 per operator before this module); here the products the
estimators ask for are the trials: the first calls at a batch size go round the candidates,
the rest use the fastest. Every candidate computes the same product, so a trial is never a
wasted product, only a possibly slower one.

Rules, per batch size (torch-free: the caller measures and reports seconds per vector):
- each candidate gets ``trials`` timed calls, interleaved with the others' (a busy moment of
  a shared machine then does not fall on one candidate's only call), and its time is the
  fastest of them;
- a candidate more than ``prune`` times slower than the best after its first timing gets no
  second one (forward-over-reverse's single product is 2-2.5x double backward's on the
  bench models: one trial shows it);
- ``fixed`` costs (the loop's, which is the single product's and needs no trial at b) take
  part in the comparison without calls;
- after that the choice is final for that batch size.
"""

from __future__ import annotations

from typing import Mapping, Sequence


class OnlineChoice:
    """Per batch size b: ``timings[b][candidate]`` (list of seconds per vector) and, once
    decided, ``choices[b]``."""

    def __init__(self, trials: int = 2, prune: float = 1.5):
        if trials < 1:
            raise ValueError(f"trials: expected >= 1, got {trials}")
        if not prune >= 1:
            raise ValueError(f"prune: expected >= 1, got {prune}")
        self.trials = trials
        self.prune = prune
        self.timings: dict[int, dict[str, list[float]]] = {}
        self.choices: dict[int, str] = {}

    def best_time(self, b: int) -> float | None:
        """The fastest time per vector measured at batch size b (any candidate), or None."""
        times = [min(t) for t in self.timings.get(b, {}).values() if t]
        return min(times) if times else None

    def next(self, b: int, candidates: Sequence[str],
             fixed: Mapping[str, float] | None = None) -> str:
        """The candidate to run for the next call at batch size b: one still on trial, or the
        choice. ``candidates`` may shrink between calls (a candidate that failed); a choice
        no longer among them is reopened."""
        if not candidates:
            raise ValueError("candidates: expected at least one")
        fixed = dict(fixed or {})
        chosen = self.choices.get(b)
        if chosen is not None and (chosen in candidates or chosen in fixed):
            return chosen
        times = self.timings.setdefault(b, {})
        if len(candidates) == 1 and not fixed:  # nothing to compare
            self.choices[b] = candidates[0]
            return candidates[0]
        for c in candidates:  # every candidate once, in order
            if not times.get(c):
                return c
        best = min([min(times[c]) for c in candidates] + list(fixed.values()))
        # the second round in the same order: the candidates still in the race
        for c in candidates:
            if len(times[c]) < self.trials and min(times[c]) <= self.prune * best:
                return c
        costs = {c: min(times[c]) for c in candidates}
        costs.update(fixed)
        self.choices[b] = min(costs, key=costs.get)
        return self.choices[b]

    def record(self, b: int, candidate: str, seconds_per_vector: float) -> None:
        """A timed call of ``candidate`` at batch size b (calls after the choice are not
        recorded: the choice is final)."""
        if b in self.choices:
            return
        self.timings.setdefault(b, {}).setdefault(candidate, []).append(
            float(seconds_per_vector))

    def drop(self, candidate: str, min_size: int = 1) -> None:
        """Forget a candidate that failed, at batch sizes >= min_size (2: it failed only
        batched): its timings and any choice of it there."""
        for b, times in self.timings.items():
            if b >= min_size:
                times.pop(candidate, None)
        for b in [b for b, c in self.choices.items() if c == candidate and b >= min_size]:
            del self.choices[b]

    def reopen(self, candidate: str) -> None:
        """Undo the choices of ``candidate`` (their timings stay): for a fixed cost that
        changed, such as the loop's when the single product's method failed."""
        for b in [b for b, c in self.choices.items() if c == candidate]:
            del self.choices[b]
