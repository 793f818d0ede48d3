"""Scalar logging to workdir/metrics.jsonl and TensorBoard event files (workdir/tensorboard).

Only one process should write (process 0): build the writer with ``enabled=False`` on the
others and every call becomes a no-op, so callers need no branches.

metrics.jsonl is one history: that of the run the latest checkpoint continues. Opened with
``resume_step`` (the step a run restarts from), records of later steps are dropped, as the
run trains those steps again (after a kill or preemption past the last save, a fallback from
an unreadable checkpoint, or deleted checkpoints: step 0); TensorBoard hides its events past
that step too (purge_step). And a (step, name) already recorded is never written again, so a
finished run rerun (which evaluates its last step again) adds no duplicate, only new names.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Mapping
from typing import Any

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
_TB_UNSAFE = re.compile(r"[^A-Za-z0-9_./-]")
# Recorded in metrics.jsonl but not drawn as TensorBoard curves (a count, not a metric).
NOT_CURVES = ("pairs",)

logger = logging.getLogger(__name__)


class MetricWriter:
    """Appends ``{"step": s, "time": t, "<prefix>/<name>": value, ...}`` lines and TB scalars."""

    def __init__(self, workdir: str, *, enabled: bool = True,
                 resume_step: int | None = None) -> None:
        """``resume_step``: the step training restarts from (0: from scratch); records after
        it are dropped. None keeps every record."""
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        self._written: set[tuple[int, str]] = set()  # (step, tag) already in the file
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, METRICS_FILE)
        self._written = _keep_history(path, resume_step)
        # Append: a resumed run continues the same log.
        self._jsonl = open(path, "a", encoding="utf-8")  # noqa: SIM115
        from tensorboardX import SummaryWriter  # imported lazily: only process 0 needs it

        purge = None if resume_step is None else int(resume_step) + 1
        self._tb = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR), purge_step=purge)

    def write_scalars(self, step: int, scalars: Mapping[str, float], prefix: str = "") -> None:
        """Writes one JSONL record and one TB scalar per entry, tagged ``prefix/name``."""
        if not self.enabled:
            return
        tagged = {(f"{prefix}/{k}" if prefix else k): float(v) for k, v in scalars.items()}
        tagged = {k: v for k, v in tagged.items() if (int(step), k) not in self._written}
        if not tagged:
            return
        self._written.update((int(step), k) for k in tagged)
        record = {"step": int(step), "time": round(time.time(), 3), **tagged}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for tag, value in tagged.items():
            if tag.rsplit("/", 1)[-1] in NOT_CURVES:
                continue
            # TensorBoard tag names allow [A-Za-z0-9_.-/]: 'prec@0.5' -> 'prec_0.5'.
            self._tb.add_scalar(_TB_UNSAFE.sub("_", tag), value, int(step))
        self._tb.flush()

    def write_image(self, step: int, tag: str, image: Any) -> None:
        """A uint8 [H, W, 3] picture under ``tag`` in TensorBoard (not in metrics.jsonl)."""
        if not self.enabled:
            return
        self._tb.add_image(_TB_UNSAFE.sub("_", tag), image, int(step), dataformats="HWC")
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


def _keep_history(path: str, resume_step: int | None) -> set[tuple[int, str]]:
    """Drops the records of ``path`` after ``resume_step`` (and a line cut short by a kill);
    returns the (step, tag) pairs that remain."""
    if not os.path.exists(path):
        return set()
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    kept: list[str] = []
    written: set[tuple[int, str]] = set()
    later = broken = 0
    for line in lines:
        record = _parse(line)
        if record is None:
            broken += 1
        elif resume_step is not None and record["step"] > resume_step:
            later += 1
        else:
            kept.append(line if line.endswith("\n") else line + "\n")
            written.update((int(record["step"]), k) for k in record if k not in ("step", "time"))
    if later or broken or (lines and not lines[-1].endswith("\n")):
        logger.info("%s: dropped %d record(s) after step %s (trained again from there) and %d "
                    "unreadable line(s)", path, later, resume_step, broken)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    return written


def _parse(line: str) -> dict[str, Any] | None:
    """One record, or None for a line that is not one (the last write of a killed run)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and "step" in record else None


def read_metrics(workdir: str) -> list[dict[str, float]]:
    """All records of workdir/metrics.jsonl, in write order (for tests and notebooks)."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
