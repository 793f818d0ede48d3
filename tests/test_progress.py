"""The progress bar's rate and ETA come from synchronised points, not from dispatch bursts."""

from __future__ import annotations

from lts_jax.progress import ProgressBar, SyncedRate, format_duration


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_rate_leaves_out_the_compile_interval():
    clock = FakeClock()
    rate = SyncedRate(clock)
    assert rate.rate() is None and rate.eta(100) is None
    clock.now = 40.0  # step 10 synced after 30 s of compilation and 10 s of steps
    rate.mark(10)
    assert rate.rate() is None  # one point: no interval yet
    clock.now = 45.0
    rate.mark(20)
    assert rate.rate() == 2.0
    assert rate.eta(100) == 40.0


def test_bar_shows_rate_and_eta_only_from_scalar_updates():
    clock = FakeClock()
    bar = ProgressBar(100, enabled=False, clock=clock)
    # Dispatch bursts (no scalars) move the counter but never the rate.
    for step in range(1, 11):
        bar.update(step)
    clock.now = 30.0
    bar.update(10, {"loss": 1.0})
    clock.now = 35.0
    for step in range(11, 21):
        bar.update(step)
    clock.now = 40.0
    bar.update(20, {"loss": 0.5})
    postfix = bar._bar.postfix  # tqdm keeps the formatted postfix even when disabled
    assert "rate=1 step/s" in postfix and "eta=1:20" in postfix and "loss=0.5" in postfix
    bar.close()


def test_format_duration():
    assert format_duration(5) == "0:05"
    assert format_duration(65) == "1:05"
    assert format_duration(3725) == "1:02:05"
