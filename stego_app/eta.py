"""Elapsed and remaining time of a run, per stage and overall (what the UI and the CLI show).

The worker records the seconds of every finished stage in ``Run.timings`` and, while a
stage runs, its start time (wall clock, epoch seconds) in ``Run.metrics["live"]``. From
those and the stage fractions this module estimates:

- a running stage's remaining time from its own rate since its first progress report, so a
  stage's fixed start (loading weights, the first batch) does not count as pace: (t - t0) *
  (1 - f) / (f - f0), once ``MIN_SECONDS`` have passed since that report (t0, f0); where no
  first report is recorded, from the stage's start (elapsed * (1 - f) / f, once
  ``MIN_FRACTION`` is done and ``MIN_SECONDS`` elapsed, or any progress after ``LONG_SECONDS``);
- the stages still waiting from the stage weights of the worker (``STAGE_WEIGHTS``) scaled
  by how long the stages so far took compared with their weights.

Estimates are labelled "about" wherever they are shown; None means "not known yet".
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

MIN_FRACTION = 0.02
MIN_SECONDS = 2.0
LONG_SECONDS = 10.0         # a slow stage gets an estimate after this long even below MIN_FRACTION
LIVE_KEY = "live"


@dataclass(frozen=True)
class StageTime:
    stage: str
    elapsed: float | None       # None: not started
    remaining: float | None     # None: unknown (or finished: 0.0)


@dataclass(frozen=True)
class RunTimes:
    stages: tuple[StageTime, ...]
    elapsed: float              # all stages so far
    remaining: float | None     # the rest of the run; None while it cannot be estimated

    def stage(self, name: str) -> StageTime | None:
        return next((s for s in self.stages if s.stage == name), None)


def live_clock(stage: str | None, stage_elapsed: float, now: float | None = None,
               first: tuple[float, float] | None = None) -> dict[str, Any]:
    """What the worker stores under Run.metrics[LIVE_KEY] while `stage` runs.

    `first`: (fraction, stage seconds) of the stage's first report with progress, if any.
    """
    now = time.time() if now is None else now
    live: dict[str, Any] = {"stage": stage, "stage_started": now - stage_elapsed}
    if first is not None:
        live["first_fraction"], live["first_elapsed"] = float(first[0]), float(first[1])
    return live


def estimate(order: Sequence[str], weights: Mapping[str, float], stage: str | None, fraction: float,
             timings: Mapping[str, float], stage_elapsed: float | None,
             first: tuple[float, float] | None = None) -> RunTimes:
    """Times of a run whose current `stage` is `fraction` done after `stage_elapsed` seconds.

    `timings`: seconds of the stages already finished (those before `stage` in `order`).
    `stage` None: the run is not running (finished, stopped): only elapsed times.
    `first`: (fraction, stage seconds) at the stage's first progress report; the pace is
    measured from there.
    """
    rows: list[StageTime] = []
    cur = order.index(stage) if stage in order else None
    done_s = 0.0
    done_w = 0.0
    remaining_cur: float | None = None
    for i, s in enumerate(order):
        if cur is None or i < cur:
            t = timings.get(s)
            rows.append(StageTime(s, float(t) if t is not None else None, 0.0 if t is not None else None))
            if t is not None:
                done_s += float(t)
                done_w += weights.get(s, 0.0)
        elif i == cur:
            el = float(stage_elapsed or 0.0)
            f = max(0.0, min(1.0, float(fraction)))
            if f >= 1.0:
                remaining_cur = 0.0
            elif first is not None:
                f0, t0 = float(first[0]), float(first[1])
                if f > f0 and el - t0 >= MIN_SECONDS:
                    remaining_cur = (el - t0) * (1.0 - f) / (f - f0)
            elif f > 0 and el >= MIN_SECONDS and (f >= MIN_FRACTION or el >= LONG_SECONDS):
                remaining_cur = el * (1.0 - f) / f
            rows.append(StageTime(s, el, remaining_cur))
        else:
            rows.append(StageTime(s, None, None))
    elapsed = sum(r.elapsed or 0.0 for r in rows)
    if cur is None:
        return RunTimes(tuple(rows), elapsed, None)
    if remaining_cur is None:
        return RunTimes(tuple(rows), elapsed, None)
    # the stages to come: their weights at the pace seen so far (this stage's projected total included)
    seen_s = done_s + float(stage_elapsed or 0.0) + remaining_cur
    seen_w = done_w + weights.get(order[cur], 0.0)
    later_w = sum(weights.get(s, 0.0) for s in order[cur + 1:])
    pace = seen_s / seen_w if seen_w > 0 else 0.0
    later = later_w * pace
    rows = [StageTime(r.stage, r.elapsed, later * weights.get(r.stage, 0.0) / later_w
                      if i > cur and later_w > 0 else r.remaining) for i, r in enumerate(rows)]
    return RunTimes(tuple(rows), elapsed, remaining_cur + later)


def run_times(info: Any, now: float | None = None) -> RunTimes:
    """The times of a runs.RunInfo (stage, stage_progress, timings, metrics, params.crf, status)."""
    from stego_app.worker import STAGE_WEIGHTS

    order = [s for s in STAGE_WEIGHTS if info.params.crf or s != "crf"]
    total = sum(STAGE_WEIGHTS[s] for s in order)
    weights = {s: STAGE_WEIGHTS[s] / total for s in order}
    timings = {k: float(v) for k, v in (info.timings or {}).items() if isinstance(v, (int, float))}
    live = (info.metrics or {}).get(LIVE_KEY) if isinstance(info.metrics, dict) else None
    if info.status != "running" or not info.stage or info.stage not in order:
        return estimate(order, weights, None, 0.0, timings, None)
    elapsed, first = None, None
    if isinstance(live, dict) and live.get("stage") == info.stage and live.get("stage_started"):
        elapsed = max(0.0, (time.time() if now is None else now) - float(live["stage_started"]))
        if isinstance(live.get("first_fraction"), (int, float)) and isinstance(live.get("first_elapsed"), (int, float)):
            first = (float(live["first_fraction"]), float(live["first_elapsed"]))
    before = {s: t for s, t in timings.items() if s in order and order.index(s) < order.index(info.stage)}
    return estimate(order, weights, info.stage, info.stage_progress, before, elapsed, first)


def clock(seconds: float | None) -> str:
    """Seconds as m:ss or h:mm:ss ('?' when unknown)."""
    if seconds is None:
        return "?"
    s = int(round(max(0.0, float(seconds))))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def times_line(times: RunTimes, stage: str | None) -> str:
    """'training 0:12, about 0:28 left · run 1:02, about 1:40 left' (the CLI's progress suffix)."""
    parts = []
    st = times.stage(stage) if stage else None
    if st is not None and st.elapsed is not None:
        left = f", about {clock(st.remaining)} left" if st.remaining is not None else ""
        parts.append(f"{stage} {clock(st.elapsed)}{left}")
    left = f", about {clock(times.remaining)} left" if times.remaining is not None else ""
    parts.append(f"run {clock(times.elapsed)}{left}")
    return " · ".join(parts)
