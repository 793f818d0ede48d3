"""Config files: every file loads with the contract's fields, overrides work, typos fail."""

from __future__ import annotations

import glob
import json
import os

import jax
import pytest
from absl import flags
from ml_collections import config_flags

from lts_jax.train_setup import resolve_config, resolve_dtype
from lts_jax.workdir_config import (
    ConfigMismatchError,
    check_resumable,
    config_to_dict,
    write_config,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(
    p for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
    if os.path.basename(p) not in ("__init__.py", "base.py")
)
# docs/CONTRACTS.md "Config schema".
CONTRACT_FIELDS = [
    "seed", "data.dataset", "data.data_dir", "data.manual_dir", "data.image_size",
    "data.max_text_len", "data.vocab_size", "data.train_split", "data.eval_splits",
    "data.num_workers", "data.flip", "data.photometric", "model.vocab_size", "model.dtype",
    "loss.prior_weight", "loss.dice_weight", "optim.name", "optim.learning_rate",
    "optim.weight_decay", "optim.warmup_steps", "optim.schedule", "optim.clip_norm",
    "optim.backbone_lr_mult", "batch_size", "eval_batch_size", "num_train_steps", "log_every",
    "eval_every", "checkpoint_every", "keep_checkpoints", "threshold", "empty_union_iou",
    "init.visual_weights",
]


def _parse(argv: list[str]):
    """Parses argv the way train.py does (locked config) on a private FlagValues."""
    values = flags.FlagValues()
    argv = ["train.py", *argv]
    # Override flags (--config.x.y) are registered from the argv seen at definition time.
    config_flags.DEFINE_config_file(
        "config", None, flag_values=values, lock_config=True, sys_argv=argv
    )
    values(argv)
    return values.config


def _get(config, dotted: str):
    node = config
    for name in dotted.split("."):
        node = node[name]
    return node


def test_config_files_exist():
    names = {os.path.basename(p) for p in CONFIG_FILES}
    assert {"refshapes.py", "refcoco.py", "refcoco_plus.py", "refcocog_umd.py",
            "refcocog_google.py"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_every_config_has_contract_fields_and_documents_its_command(path):
    config = _parse([f"--config={path}"])
    for field in CONTRACT_FIELDS:
        _get(config, field)  # KeyError / AttributeError if missing
    # Batches split evenly over 4 devices (GPUs, TPU chips); RefShapes, a CPU config whose
    # train batch holds 10 images, over the 2 devices of a 2-core machine (--cpu_devices=auto
    # lowers the count until it divides).
    devices = 2 if os.path.basename(path) == "refshapes.py" else 4
    images = config.batch_size // config.data.objects_per_image
    assert config.batch_size % config.data.objects_per_image == 0
    assert images % devices == 0 and config.eval_batch_size % devices == 0
    assert config.data.image_size % 32 == 0
    with open(path, encoding="utf-8") as f:
        assert f"python train.py --config configs/{os.path.basename(path)}" in f.read()


def test_override_and_typo():
    path = os.path.join(REPO, "configs", "refshapes.py")
    config = _parse([f"--config={path}:tiny", "--config.num_train_steps=7",
                     "--config.optim.learning_rate=0.5", "--config.data.flip=true"])
    assert config.num_train_steps == 7
    assert config.optim.learning_rate == 0.5
    assert config.data.flip is True
    assert config.model.variant == "tiny"
    with pytest.raises(Exception, match="num_train_step"):
        _parse([f"--config={path}:tiny", "--config.num_train_step=7"])
    with pytest.raises(Exception, match="learning_rat"):
        _parse([f"--config={path}", "--config.optim.learning_rat=0.5"])
    with pytest.raises(flags.IllegalFlagValueError, match="variant"):
        _parse([f"--config={path}:huge"])


def test_paper_config_dtype_argument():
    path = os.path.join(REPO, "configs", "refcoco.py")
    assert _parse([f"--config={path}"]).model.dtype == "auto"
    assert _parse([f"--config={path}:cpu"]).model.dtype == "float32"
    assert _parse([f"--config={path}:gpu"]).model.dtype == "bfloat16"
    paper = _parse([f"--config={path}"])
    assert paper.data.image_size == 416 and paper.model.variant == "full"
    assert paper.data.eval_splits == "validation,testA,testB"
    expected = "bfloat16" if jax.default_backend() in ("gpu", "tpu") else "float32"
    assert resolve_dtype("auto") == expected
    resolved = resolve_config(paper, vocab_size=123)
    assert resolved.model.dtype == expected and resolved.model.vocab_size == 123
    assert paper.model.dtype == "auto"  # resolve_config copies


def test_resume_check_allows_run_length_but_not_model_changes(tmp_path):
    path = os.path.join(REPO, "configs", "refshapes.py")
    config = resolve_config(_parse([f"--config={path}:tiny"]), vocab_size=50)
    assert config.optim.schedule_steps == config.num_train_steps == 4
    write_config(str(tmp_path), config)
    other_io = resolve_config(
        _parse([f"--config={path}:tiny", "--config.log_every=1",
                "--config.eval_every=3", "--config.data.data_dir=/elsewhere"]), vocab_size=50)
    check_resumable(str(tmp_path), other_io)  # no error
    # A longer run would re-time the learning-rate schedule: refused, naming the way to extend.
    longer = [f"--config={path}:tiny", "--config.num_train_steps=99"]
    with pytest.raises(ConfigMismatchError, match=r"(?s)optim\.schedule_steps: workdir has 4, "
                       r"this run has 99.*--config\.optim\.schedule_steps=4"):
        check_resumable(str(tmp_path), resolve_config(_parse(longer), vocab_size=50))
    extended = resolve_config(_parse([*longer, "--config.optim.schedule_steps=4"]), 50)
    check_resumable(str(tmp_path), extended)  # no error: same schedule, more steps
    wider = resolve_config(
        _parse([f"--config={path}:tiny", "--config.model.fusion.dim=32"]), vocab_size=50)
    with pytest.raises(ConfigMismatchError, match=r"model\.fusion\.dim: workdir has 16"):
        check_resumable(str(tmp_path), wider)
    with pytest.raises(ConfigMismatchError, match="batch_size"):
        check_resumable(str(tmp_path), resolve_config(
            _parse([f"--config={path}:tiny", "--config.batch_size=4"]), vocab_size=50))


def test_workdirs_saved_before_schedule_steps_and_low_res_still_resume(tmp_path):
    path = os.path.join(REPO, "configs", "refshapes.py")
    config = resolve_config(_parse([f"--config={path}:tiny"]), vocab_size=50)
    old = config_to_dict(config)
    del old["optim"]["schedule_steps"], old["data"]["low_res_image_size"]
    del old["data"]["low_res_steps"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    check_resumable(str(tmp_path), config)  # no error
    with pytest.raises(ConfigMismatchError, match="schedule_steps=4"):
        check_resumable(str(tmp_path), resolve_config(
            _parse([f"--config={path}:tiny", "--config.num_train_steps=6"]), vocab_size=50))
