"""Evaluate a trained workdir on its eval splits: mIoU, oIoU and Prec@0.5..0.9.

    python eval.py --workdir runs/refshapes [--splits validation,testA,testB]
    python eval.py --workdir runs/refcoco --config configs/refcoco.py --config.threshold=0.35
    python eval.py --workdir runs/refshapes --shuffle_expressions

Prints a Markdown table and writes eval_results.{md,csv,json} into the workdir. Without
--config the workdir's config.json is used; with it, data/evaluation fields come from
--config while the model architecture always comes from config.json (it must match the
checkpoint). --shuffle_expressions adds, per split, a row evaluated with expressions
exchanged among the examples of each batch (how much the model relies on language).
"""

from __future__ import annotations

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from lts_jax import evaluate
from lts_jax.checkpoint import load_for_inference
from lts_jax.mesh import make_mesh
from lts_jax.models.model import create_model
from lts_jax.results_table import SplitResult, format_markdown, write_results
from lts_jax.tokenizer import load_tokenizer

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file for data/eval settings (default: workdir/config.json).",
    lock_config=True,
)
flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/ and config.json.")
flags.DEFINE_string("splits", "", "Comma-separated splits (default: config.data.eval_splits).")
flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "Which checkpoint to evaluate.")
flags.DEFINE_bool("shuffle_expressions", False,
                  "Also evaluate with expressions shuffled across each batch.")
flags.DEFINE_bool("distributed", False,
                  "Call jax.distributed.initialize() first (multi-host; settings from the "
                  "environment, e.g. on Cloud TPU or SLURM).")
flags.mark_flag_as_required("workdir")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every restore step at INFO
    if FLAGS.distributed:
        jax.distributed.initialize()
    try:
        saved, variables, step = load_for_inference(FLAGS.workdir, FLAGS.checkpoint)
    except FileNotFoundError as err:
        raise SystemExit(f"eval.py: error: {err}") from err
    config = saved
    if FLAGS.config is not None:
        config = FLAGS.config.copy_and_resolve_references()
        with config.unlocked():
            config.model = saved.model  # the checkpoint's architecture, dtype resolved
    splits = [s for s in (FLAGS.splits or config.data.eval_splits).split(",") if s.strip()]

    model = create_model(config.model)
    mesh = make_mesh()
    tokenizer = load_tokenizer(config)
    if tokenizer.vocab_size != int(config.model.vocab_size):
        raise SystemExit(
            f"eval.py: error: the tokenizer under {config.data.data_dir} has "
            f"{tokenizer.vocab_size} pieces, the checkpoint expects {config.model.vocab_size}"
        )
    results = []
    for split in splits:
        split = split.strip()
        for shuffled in (False, True) if FLAGS.shuffle_expressions else (False,):
            scores = evaluate.evaluate_split(
                config, model, variables, split, tokenizer, mesh, shuffle_expressions=shuffled
            )
            results.append(SplitResult(config.data.dataset, split, scores, shuffled=shuffled))

    if jax.process_index() == 0:
        print(format_markdown(results), end="")
        metadata = {
            "workdir": FLAGS.workdir,
            "checkpoint": FLAGS.checkpoint,
            "checkpoint_step": step,
            "dataset": config.data.dataset,
            "threshold": float(config.threshold),
            "empty_union_iou": float(config.empty_union_iou),
            "image_size": int(config.data.image_size),
        }
        paths = write_results(FLAGS.workdir, results, metadata)
        print(f"wrote {', '.join(str(p) for p in paths.values())}")


if __name__ == "__main__":
    app.run(main)
