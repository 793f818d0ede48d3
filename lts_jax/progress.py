"""Console progress bar with ETA for the training loop (tqdm), silent on processes other than 0."""

from __future__ import annotations

from collections.abc import Mapping

from tqdm import tqdm


class ProgressBar:
    """Steps done / total, rate and ETA; the latest logged scalars in the postfix."""

    def __init__(self, total_steps: int, initial_step: int = 0, *, enabled: bool = True) -> None:
        self._bar = tqdm(
            total=total_steps,
            initial=initial_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=not enabled,
            # ETA from recent steps only: the first step includes compilation.
            smoothing=0.1,
        )
        self._step = initial_step

    def update(self, step: int, scalars: Mapping[str, float] | None = None) -> None:
        """Moves the bar to ``step`` (absolute) and shows ``scalars`` if given."""
        if step > self._step:
            self._bar.update(step - self._step)
            self._step = step
        if scalars:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in scalars.items()}, refresh=False)

    def write(self, message: str) -> None:
        """Prints a line above the bar without breaking it."""
        if not self._bar.disable:
            self._bar.write(message)

    def close(self) -> None:
        self._bar.close()
