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


def test_eval_multiprocess_flags_join_with_gloo_like_train(tmp_path):
    """eval.py --distributed (and --multiprocess) goes through cli.start as train.py does:
    gloo collectives on CPU, then jax.distributed.initialize with the coordinator flags."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "import jax\n"
        "calls = []\n"
        "jax.distributed.initialize = lambda **kw: calls.append(kw)\n"
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('eval_cli', {str(REPO / 'eval.py')!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "from absl import flags\n"
        "argv = flags.FLAGS(sys.argv)\n"
        "from lts_jax import cli\n"
        "cli.start(argv)\n"
        "print(jax.config.jax_cpu_collectives_implementation, calls)\n"
    )
    for flag in ("--distributed", "--multiprocess"):
        result = subprocess.run(
            [sys.executable, str(script), "--workdir=/nonexistent", flag,
             "--coordinator_address=127.0.0.1:1234", "--num_processes=2", "--process_id=1"],
            cwd=REPO, capture_output=True, text=True, timeout=120,
            env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == ("gloo [{'coordinator_address': '127.0.0.1:1234', "
                                         "'num_processes': 2, 'process_id': 1}]")
