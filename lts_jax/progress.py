"""Console progress bar for the training loop (tqdm), silent on processes other than 0.

Steps are dispatched asynchronously, so the step counter races ahead of the device and then
waits at each host sync; tqdm's own rate and ETA, computed from those bursts, were wrong (an ETA
of 36 minutes for a 2-minute job after step 1). Here the rate comes only from updates that carry
scalars, which the loop makes at its log steps after fetching metrics, i.e. after the device has
finished those steps; the first such interval, which includes compilation, is left out.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from tqdm import tqdm


def format_duration(seconds: float) -> str:
    """'1:02:03' / '4:05' style."""
    seconds = int(round(max(seconds, 0.0)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class SyncedRate:
    """Steps per second between synchronised points, excluding the first (compile) interval."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._first: tuple[int, float] | None = None
        self._last: tuple[int, float] | None = None

    def mark(self, step: int) -> None:
        """Records that the device has finished ``step`` now."""
        point = (step, self._clock())
        if self._first is None:
            self._first = point
        self._last = point

    def rate(self) -> float | None:
        """Steps/s since the first mark, or None before two marks."""
        if self._first is None or self._last is None or self._last[0] <= self._first[0]:
            return None
        (s0, t0), (s1, t1) = self._first, self._last
        return (s1 - s0) / max(t1 - t0, 1e-9)

    def eta(self, total_steps: int) -> float | None:
        """Seconds until ``total_steps`` at the measured rate, from the last mark."""
        rate = self.rate()
        if rate is None or self._last is None:
            return None
        return (total_steps - self._last[0]) / rate


class ProgressBar:
    """Steps done / total; the latest logged scalars, the synchronised rate and ETA."""

    def __init__(self, total_steps: int, initial_step: int = 0, *, enabled: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._bar = tqdm(
            total=total_steps,
            initial=initial_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=not enabled,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
        )
        self._total = total_steps
        self._step = initial_step
        self._rate = SyncedRate(clock)
        self._postfix: dict[str, str] = {}
        self._previous_rate: SyncedRate | None = None

    def update(self, step: int, scalars: Mapping[str, float] | None = None) -> None:
        """Moves the bar to ``step`` (absolute). ``scalars`` (given at log steps, after a host
        sync) are shown and mark a synchronised point for the rate and ETA."""
        if step > self._step:
            self._bar.update(step - self._step)
            self._step = step
        if scalars:
            self._rate.mark(step)
            postfix = {k: f"{v:.4g}" for k, v in scalars.items()}
            rate, eta = self._rate.rate(), self._rate.eta(self._total)
            if rate is None and self._previous_rate is not None:
                # Until the new rate is measured, the previous one beats '?'.
                rate = self._previous_rate.rate()
                eta = None if rate is None else (self._total - step) / rate
            postfix["rate"] = "?" if rate is None else f"{rate:.3g} step/s"
            postfix["eta"] = "?" if eta is None else format_duration(eta)
            self._bar.set_postfix(postfix, refresh=True)

    def restart_rate(self) -> None:
        """Measures the rate afresh from the next synchronised point (the step got cheaper or
        dearer, e.g. after progressive resizing; the interval holding its compile is left out)."""
        self._previous_rate = self._rate
        self._rate = SyncedRate(self._rate._clock)

    def write(self, message: str) -> None:
        """Prints a line above the bar without breaking it."""
        if not self._bar.disable:
            self._bar.write(message)

    def close(self) -> None:
        self._bar.close()
