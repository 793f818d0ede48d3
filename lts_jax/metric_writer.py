"""Scalar logging to workdir/metrics.jsonl and TensorBoard event files (workdir/tensorboard).

Only one process should write (process 0): build the writer with ``enabled=False`` on the
others and every call becomes a no-op, so callers need no branches.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
_TB_UNSAFE = re.compile(r"[^A-Za-z0-9_./-]")


class MetricWriter:
    """Appends ``{"step": s, "time": t, "<prefix>/<name>": value, ...}`` lines and TB scalars."""

    def __init__(self, workdir: str, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        # Append: a resumed run continues the same log.
        self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a", encoding="utf-8")  # noqa: SIM115
        from tensorboardX import SummaryWriter  # imported lazily: only process 0 needs it

        self._tb = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR))

    def write_scalars(self, step: int, scalars: Mapping[str, float], prefix: str = "") -> None:
        """Writes one JSONL record and one TB scalar per entry, tagged ``prefix/name``."""
        if not self.enabled:
            return
        tagged = {(f"{prefix}/{k}" if prefix else k): float(v) for k, v in scalars.items()}
        record = {"step": int(step), "time": round(time.time(), 3), **tagged}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for tag, value in tagged.items():
            # TensorBoard tag names allow [A-Za-z0-9_.-/]: 'prec@0.5' -> 'prec_0.5'.
            self._tb.add_scalar(_TB_UNSAFE.sub("_", tag), value, int(step))
        self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(workdir: str) -> list[dict[str, float]]:
    """All records of workdir/metrics.jsonl, in write order (for tests and notebooks)."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
