"""The resolved config in workdir/config.json, and the rule for resuming with a changed one.

A run may be resumed with different run-length, logging, evaluation or I/O settings, but not
with anything that changes the model, the data stream or the optimisation: the checkpoint
would then not belong to the run being asked for.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

CONFIG_FILE = "config.json"

# Dotted field names (or prefixes ending in '.') that may differ between a workdir's saved
# config and the config of a run resuming in it.
RESUME_SAFE_FIELDS = (
    # Safe because the schedule's length is optim.schedule_steps (resolved from it and not
    # safe): a run is extended by keeping schedule_steps, never by silently re-timing it.
    "num_train_steps",
    "log_every",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "eval_batch_size",
    "threshold",
    "empty_union_iou",
    "data.data_dir",
    "data.manual_dir",
    "data.eval_splits",
    "data.num_workers",
    "data.cache_decoded",  # where decoded examples come from, not which
    "model.dtype",  # compute dtype only: parameters are float32 either way
    "init.",  # only used for a fresh start
)


class ConfigMismatchError(ValueError):
    """The workdir holds a run whose config differs in a field that matters for resuming."""


def config_path(workdir: str) -> str:
    return os.path.join(workdir, CONFIG_FILE)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Plain JSON types (tuples become lists), as written to config.json."""
    return json.loads(config.to_json())


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Writes config.json atomically (call on process 0 only)."""
    os.makedirs(workdir, exist_ok=True)
    path = config_path(workdir)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(config_to_dict(config), f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def read_config(workdir: str) -> ml_collections.ConfigDict | None:
    """The saved config of a workdir, or None when there is none."""
    path = config_path(workdir)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return ml_collections.ConfigDict(json.load(f))


def _resume_safe(field: str) -> bool:
    return any(
        field.startswith(safe) if safe.endswith(".") else field == safe
        for safe in RESUME_SAFE_FIELDS
    )


def _with_legacy_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A flattened config.json from before a field existed, with the value that field takes
    for the run it describes (so older workdirs still resume)."""
    defaults = {"data.low_res_image_size": 0, "data.low_res_steps": 0, "optim.ema_decay": 0.0,
                "data.objects_per_image": 1,
                "optim.schedule_steps": saved.get("num_train_steps")}
    return {**{k: v for k, v in defaults.items() if v is not None}, **saved}


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Fields (dotted) that differ and are not resume-safe, with both values."""
    a, b = _with_legacy_defaults(_flatten(saved)), _flatten(current)
    diffs = []
    for field in sorted(set(a) | set(b)):
        if _resume_safe(field):
            continue
        if a.get(field, "<missing>") != b.get(field, "<missing>"):
            diffs.append(
                f"{field}: workdir has {a.get(field, '<missing>')!r}, "
                f"this run has {b.get(field, '<missing>')!r}"
            )
    return diffs


def check_resumable(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Raises ConfigMismatchError if workdir/config.json belongs to a different run."""
    saved = read_config(workdir)
    if saved is None:
        return
    saved_dict = config_to_dict(saved)
    diffs = config_differences(saved_dict, config_to_dict(config))
    if diffs:
        hint = "Use a new --workdir, or override these fields back to the workdir's values."
        if any(d.startswith("optim.schedule_steps:") for d in diffs):
            steps = _with_legacy_defaults(_flatten(saved_dict))["optim.schedule_steps"]
            hint = (f"A changed num_train_steps would rebuild the learning-rate schedule. To "
                    f"extend the run on its own schedule (the rate stays at its final value "
                    f"after step {steps}), add --config.optim.schedule_steps={steps}; for "
                    "a new schedule, use a new --workdir.")
        raise ConfigMismatchError(
            f"Refusing to resume in {workdir}: its config.json differs from this run in fields "
            "that change the model, data or optimisation:\n  " + "\n  ".join(diffs)
            + "\n" + hint
        )
