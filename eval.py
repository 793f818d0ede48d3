"""Evaluate a trained workdir on its eval splits: mIoU, oIoU and Prec@0.5..0.9.

    python eval.py --workdir runs/refshapes [--splits validation,testA,testB]
    python eval.py --workdir runs/refcoco --config configs/refcoco.py --config.threshold=0.35
    python eval.py --workdir runs/refshapes --shuffle_expressions

Prints a Markdown table and writes, into its own folder
<workdir>/eval/step_<step>_<split-split...>[_shuffled][_<setting>...]/ (lts_jax/report.py),
the tables eval_results.{md,csv,json}, a per-pair CSV per split (pairs_<split>.csv, and
pairs_<split>_shuffled.csv: pair, ref, ann, image and sentence ids, expression, intersection,
union, IoU) and report.html (self-contained: table, IoU histogram, Prec@X curve, galleries of
the worst, median and best pairs). Another evaluation (other splits, step or settings) gets
another folder; the same one again replaces its folder. --gallery=0 skips the galleries.

Without --config the workdir's config.json is used; with it, data/evaluation fields come
from --config while the model architecture always comes from config.json (it must match the
checkpoint); a threshold or other evaluation setting that differs from config.json is part of
the folder name. --shuffle_expressions adds, per split, a row evaluated with expressions
exchanged among the examples of each batch (how much the model relies on language).
Several hosts: add ``--multiprocess``, as for train.py.
"""

from __future__ import annotations

import jax
import ml_collections
from absl import flags

from lts_jax import cli

FLAGS = flags.FLAGS
cli.define_flags(config="Config file for data/eval settings (default: workdir/config.json).",
                 multiprocess=True,
                 workdir_help="Training workdir holding checkpoints/ and config.json.")
flags.DEFINE_string("splits", "", "Comma-separated splits (default: config.data.eval_splits).")
flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "Which checkpoint to evaluate.")
flags.DEFINE_bool("shuffle_expressions", False,
                  "Also evaluate with expressions shuffled across each batch.")
flags.DEFINE_integer("gallery", 4, "Pairs per gallery group (worst, median, best) in "
                     "report.html; 0: no galleries.", lower_bound=0)


def _config(saved: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """--config's data/evaluation fields with the checkpoint's model, or the saved config."""
    if FLAGS.config is None:
        return saved
    config = FLAGS.config.copy_and_resolve_references()
    with config.unlocked():
        config.model = saved.model  # the checkpoint's architecture, dtype resolved
    return config


def main(argv: list[str]) -> None:
    cli.start(argv)
    from lts_jax import report
    from lts_jax.checkpoint import CheckpointUnreadableError, load_for_inference
    from lts_jax.evaluate import Evaluator, split_names
    from lts_jax.mesh import make_mesh
    from lts_jax.models.model import create_model
    from lts_jax.results_table import SplitResult, format_markdown, run_metadata
    from lts_jax.tokenizer import load_tokenizer

    try:
        saved, variables, step = load_for_inference(FLAGS.workdir, FLAGS.checkpoint)
    except (FileNotFoundError, CheckpointUnreadableError) as err:
        cli.fail(err)
    config = _config(saved)
    tokenizer = load_tokenizer(config)
    if tokenizer.vocab_size != int(config.model.vocab_size):
        cli.fail(ValueError(f"the tokenizer under {config.data.data_dir} has "
                            f"{tokenizer.vocab_size} pieces, the checkpoint expects "
                            f"{config.model.vocab_size}"))
    evaluator = Evaluator(config, create_model(config.model), make_mesh(), tokenizer)
    splits = split_names(FLAGS.splits or config.data.eval_splits, config)
    runs = []
    for split in splits:
        for shuffled in ((False, True) if FLAGS.shuffle_expressions else (False,)):
            metrics, pairs = evaluator.evaluate_pairs(variables, split,
                                                      shuffle_expressions=shuffled)
            runs.append(report.EvalRun(SplitResult(config.data.dataset, split, metrics,
                                                   shuffled), pairs))
    if jax.process_index() == 0:
        print(format_markdown([r.result for r in runs]), end="")
        name = report.eval_dir_name(step, splits, shuffled=FLAGS.shuffle_expressions,
                                    tags=report.config_tags(config, saved))
        metadata = {**run_metadata(config, FLAGS.workdir, step, FLAGS.checkpoint),
                    "splits": splits, "shuffle_expressions": bool(FLAGS.shuffle_expressions),
                    "folder": name}
        paths = report.write_evaluation(report.eval_dir(FLAGS.workdir, name), runs, metadata,
                                        evaluator=evaluator, variables=variables,
                                        gallery=FLAGS.gallery)
        print(f"wrote {paths['report'].parent}/: "
              + ", ".join(sorted(p.name for p in paths.values())))


if __name__ == "__main__":
    cli.run(main)
