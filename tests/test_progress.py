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


def test_restart_rate_measures_the_new_step_cost_leaving_out_its_compile():
    """After progressive resizing the step costs more: the rate is measured afresh (the
    interval holding the new compile left out), showing the old one until then."""
    clock = FakeClock()
    bar = ProgressBar(100, enabled=False, clock=clock)
    for step, now in ((10, 10.0), (20, 12.0)):  # 5 steps/s at the low resolution
        clock.now = now
        bar.update(step, {"loss": 1.0})
    bar.restart_rate()
    clock.now = 40.0  # includes the full-size compile
    bar.update(30, {"loss": 0.9})
    assert "rate=5 step/s" in bar._bar.postfix and "eta=0:14" in bar._bar.postfix
    clock.now = 45.0
    bar.update(40, {"loss": 0.8})
    assert "rate=2 step/s" in bar._bar.postfix and "eta=0:30" in bar._bar.postfix
    bar.close()
