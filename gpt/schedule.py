"""Learning-rate schedules: warmup + cosine (nanoGPT) and warmup-stable-decay (WSD).

A schedule is a list of segments. A fresh run has one segment starting at iteration 0.
Continuing a finished run to a larger `max_iters` adds (policy `rewarm`) or stretches
(policy `extend`) a segment, so the whole LR history of a run stays one pure function
`lr_at(it)`. The schedule is saved as a JSON-able dict in every checkpoint, so a resumed
run follows exactly the same curve, and any LR discontinuity is reported, never silent.

One segment, for iterations `it` from `start_iter` on (t = it - start_iter):

    warmup   t < warmup:       warmup_from + (peak - warmup_from) * (t + 1) / (warmup + 1)
    cosine   it < end_iter:    floor + 0.5 * (1 + cos(pi * ratio)) * (peak - floor)
    wsd      it < decay start: peak; then linear down to floor at end_iter
    after    it >= end_iter:   floor

With warmup_from = 0 this is exactly nanoGPT's get_lr.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from configs.schema import TrainConfig

@dataclass(frozen=True)
class Segment:
    """One warmup-then-decay stretch of the schedule."""

    start_iter: int
    end_iter: int  # the LR reaches `floor` here and stays there
    kind: Literal["cosine", "wsd"]
    peak: float
    floor: float
    warmup: int
    warmup_from: float = 0.0  # LR the warmup starts from: 0 for a fresh run, the last LR for a rewarm
    decay_fraction: float = 1.0  # WSD: share of the segment's iterations spent decaying
    shape_from: int | None = None  # where its warmup and decay are counted from, if not start_iter (a rescaled rest)

    @property
    def origin(self) -> int:
        return self.start_iter if self.shape_from is None else self.shape_from

    def lr_at(self, it: int) -> float:
        t = it - self.origin
        if t < self.warmup:
            return self.warmup_from + (self.peak - self.warmup_from) * (t + 1) / (self.warmup + 1)
        if it >= self.end_iter:
            return self.floor
        decay_begins = self.decay_start()
        if it < decay_begins:
            return self.peak
        decay_ratio = (it - decay_begins) / (self.end_iter - decay_begins)
        if self.kind == "cosine":
            coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # ranges 1..0
            return self.floor + coeff * (self.peak - self.floor)
        return self.floor + (1.0 - decay_ratio) * (self.peak - self.floor)

    def decay_start(self) -> int:
        """First iteration of the decay: right after warmup for cosine, the last
        `decay_fraction` of the segment for WSD (never before warmup ends)."""
        after_warmup = self.origin + self.warmup
        if self.kind == "cosine":
            return after_warmup
        decay_iters = round(self.decay_fraction * (self.end_iter - self.origin))
        return max(after_warmup, self.end_iter - decay_iters)


@dataclass(frozen=True)
class Continuation:
    """What changed when a schedule was continued: for the log and metrics.jsonl."""

    policy: str
    at_iter: int
    old_max_iters: int
    new_max_iters: int
    lr_before: float  # LR of the last trained iteration (at_iter - 1)
    lr_after: float  # LR of the first new iteration (at_iter)
    jump: float  # lr_after - lr_before
    largest_later_step: float  # the largest LR change between two later iterations
    is_jump: bool  # the boundary changes the LR more than any later step does

    def describe(self) -> str:
        text = (
            f"LR schedule continued at iteration {self.at_iter} from max_iters {self.old_max_iters} to "
            f"{self.new_max_iters} with policy '{self.policy}': LR {self.lr_before:.3e} at iteration "
            f"{self.at_iter - 1} → {self.lr_after:.3e} at iteration {self.at_iter}"
        )
        if self.is_jump:
            fix = "raise train.rewarm_iters" if self.policy == "rewarm" else "use train.continue_policy=rewarm"
            text += (
                f"; this is a jump of {self.jump:+.3e}, larger than any later step ({self.largest_later_step:.3e}); "
                f"{fix} for a gradual change"
            )
        return text


class Schedule:
    """The LR at every iteration of a run, as a list of segments."""

    def __init__(self, segments: list[Segment], max_iters: int):
        if not segments or segments[0].start_iter != 0:
            raise ValueError("a schedule needs segments, the first one starting at iteration 0")
        self.segments = list(segments)
        self.max_iters = max_iters  # the iteration count this schedule was planned for

    @classmethod
    def from_config(cls, train: TrainConfig) -> Schedule:
        """A fresh run's schedule: warmup to learning_rate, decay to min_lr at lr_decay_iters."""
        segment = Segment(
            start_iter=0,
            end_iter=train.lr_decay_iters or train.max_iters,
            kind=train.schedule,
            peak=train.learning_rate,
            floor=train.min_lr,
            warmup=train.warmup_iters,
            decay_fraction=train.wsd_decay_fraction,
        )
        return cls([segment], max_iters=train.max_iters)

    def lr_at(self, it: int) -> float:
        """The learning rate of iteration `it` (0-based). Pure: no state changes."""
        current = self.segments[0]
        for segment in self.segments:
            if segment.start_iter <= it:
                current = segment
        return current.lr_at(it)

    def continued(self, train: TrainConfig, at_iter: int) -> tuple[Schedule, Continuation]:
        """The schedule for growing max_iters to `train.max_iters`, resuming at `at_iter`.

        rewarm: a new segment from `at_iter` that warms up over `train.rewarm_iters`
            from the LR the run ended at to `train.learning_rate`, then decays
            (`train.schedule`: cosine, or WSD's stable-then-linear) to `train.min_lr`
            at the new max_iters.
        extend: the last segment is stretched to end at the new max_iters, as if that
            had been the target from the start. For WSD resumed before its decay this
            simply continues the stable phase. For cosine (or a WSD run that had already
            decayed) the LR jumps up at `at_iter`; the returned Continuation says by how much.

        A boundary is a jump when it changes the LR more than any later step of the new
        schedule does (a rewarm's first step equals its other warmup steps, so it is not).
        """
        new_max = train.max_iters
        ended_at = self.lr_at(at_iter - 1) if at_iter > 0 else 0.0
        if train.continue_policy == "rewarm":
            rewarm = Segment(
                start_iter=at_iter,
                end_iter=new_max,
                kind=train.schedule,
                peak=train.learning_rate,
                floor=train.min_lr,
                warmup=min(train.rewarm_iters, max(new_max - at_iter - 1, 0)),
                warmup_from=ended_at,
                decay_fraction=train.wsd_decay_fraction,
            )
            kept = [s for s in self.segments if s.start_iter < at_iter]
            new = Schedule(kept + [rewarm], max_iters=new_max)
        else:
            stretched = replace(self.segments[-1], end_iter=new_max)
            new = Schedule(self.segments[:-1] + [stretched], max_iters=new_max)
        lr_after = new.lr_at(at_iter)
        later = [new.lr_at(it) for it in range(at_iter, new_max + 1)]
        largest_later_step = max((abs(b - a) for a, b in zip(later, later[1:])), default=0.0)
        jump = lr_after - ended_at if at_iter > 0 else 0.0
        continuation = Continuation(
            policy=train.continue_policy,
            at_iter=at_iter,
            old_max_iters=self.max_iters,
            new_max_iters=new_max,
            lr_before=ended_at,
            lr_after=lr_after,
            jump=jump,
            largest_later_step=largest_later_step,
            is_jump=abs(jump) > largest_later_step * (1 + 1e-9),
        )
        return new, continuation

    def rescaled(self, peak: float, floor: float, at_iter: int) -> Schedule:
        """The same curve from `at_iter` on, with the segment then in force given a new peak and
        floor (a resumed run whose train.learning_rate or min_lr was changed, e.g. after a
        divergence); the iterations before keep the LR they were trained with."""
        current = [s for s in self.segments if s.start_iter <= at_iter][-1]
        rest = replace(current, start_iter=at_iter, shape_from=current.origin, peak=peak, floor=floor,
                       warmup_from=min(current.warmup_from, peak))
        kept = [s for s in self.segments if s.start_iter < at_iter]
        return Schedule(kept + [rest], max_iters=self.max_iters)

    def state_dict(self) -> dict[str, Any]:
        return {"max_iters": self.max_iters, "segments": [asdict(s) for s in self.segments]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        loaded = Schedule.from_state_dict(state)
        self.segments, self.max_iters = loaded.segments, loaded.max_iters

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Schedule:
        return cls([Segment(**s) for s in state["segments"]], max_iters=state["max_iters"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schedule) and self.state_dict() == other.state_dict()

    def __repr__(self) -> str:
        return f"Schedule(max_iters={self.max_iters}, segments={self.segments})"
