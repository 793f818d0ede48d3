"""Per-stage parameter and FLOP summary (eval_shape + XLA cost analysis)."""

import os
import subprocess
import sys
import textwrap

import pytest

from lts_jax.models.model import STAGES, model_config
from lts_jax.summary import format_costs, stage_costs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny() -> object:
    cfg = model_config("tiny")
    cfg.vocab_size = 50
    return cfg


@pytest.mark.parametrize("skip_dim", [0, 4])
def test_stage_costs_add_up(skip_dim: int) -> None:
    cfg = _tiny()
    if skip_dim:  # the RefShapes decoder: stride-2 logits with C1/C2 skips
        cfg.segment.out_stride, cfg.segment.skip_dim = 2, skip_dim
    costs = stage_costs(cfg, image_size=64, max_text_len=6)
    assert list(costs) == [*STAGES, "total"]
    assert sum(costs[s]["params"] for s in STAGES) == costs["total"]["params"]
    assert all(costs[s]["flops"] > 0 for s in STAGES)
    stage_sum = sum(costs[s]["flops"] for s in STAGES)
    assert costs["total"]["flops"] == pytest.approx(stage_sum, rel=0.02)
    # Embedding table: vocab x embed_dim parameters in the text stage.
    assert costs["text"]["params"] > 50 * 16
    table = format_costs(costs, "tiny")
    assert table.splitlines()[0] == "tiny" and "| total |" in table


def test_text_flops_count_every_gru_step() -> None:
    short = stage_costs(_tiny(), image_size=64, max_text_len=6)["text"]["flops"]
    long = stage_costs(_tiny(), image_size=64, max_text_len=12)["text"]["flops"]
    # A scan counted once would give equal numbers; every step counted gives ~2x.
    assert long == pytest.approx(2 * short, rel=0.1)


def test_cli_prints_table_for_a_config_file(tmp_path: os.PathLike) -> None:
    config = tmp_path / "tiny_config.py"
    config.write_text(textwrap.dedent("""
        import ml_collections
        from lts_jax.models.model import model_config

        def get_config(arg=None):
            config = ml_collections.ConfigDict()
            config.model = model_config("tiny")
            config.model.dtype = "auto"
            config.data = ml_collections.ConfigDict(
                dict(image_size=64, max_text_len=8, vocab_size=40))
            return config
    """))
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-m", "lts_jax.summary", f"--config={config}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    assert "LTS 'tiny' at 64x64, L=8, vocab=40" in out
    for stage in (*STAGES, "total"):
        assert f"| {stage} |" in out
