"""The entry points' user mistakes end in one short line (exit status 1), not a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "refshapes.py") + ":tiny"


def _run(script: str, *args: str, workdir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / script), *args, f"--workdir={workdir}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("args, expected", [
    (["--config=configs/nope.py"], "train.py: error: --config: no such file 'configs/nope.py'; "
     "the configs are in "),
    (["--config=" + TINY, "--config.num_train_step=3"],
     "train.py: error: --config.num_train_step: the config has no field 'num_train_step'; "
     "did you mean 'num_train_steps'?"),
    (["--config=" + TINY, "--config.optim.lr=3"],
     "train.py: error: --config.optim.lr: the config has no field 'lr'"),
    (["--config=" + TINY[:-4] + "tiyn"],
     "Unknown refshapes variant 'tiyn'; expected '', 'tiny' or 'test'"),
])
def test_config_mistakes_end_in_one_line(tmp_path, args, expected):
    result = _run("train.py", *args, workdir=tmp_path / "run")
    assert result.returncode == 1
    assert expected in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 2
    assert not (tmp_path / "run").exists()  # nothing was started


def test_eval_config_file_not_found(tmp_path):
    result = _run("eval.py", "--config=configs/nope.py", workdir=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "eval.py: error: --config: no such file 'configs/nope.py'" in result.stderr
    assert "refshapes.py" in result.stderr and "base.py" not in result.stderr
