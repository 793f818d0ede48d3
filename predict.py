"""Segment your own images: mask, overlay, position-prior heat map and a panel per expression.

    python predict.py --workdir runs/refshapes --image photo.jpg \
        --expression "the cup on the left" --expression "the red mug" --out predictions/
    python predict.py --workdir runs/refshapes --pairs pairs.jsonl --out predictions/

--pairs reads one JSON object per line, {"image": "photo.jpg", "expression": "the red mug"}
(a relative image path is relative to the JSONL file's folder).

Writes <stem>_<index>_<slug>_{mask,overlay,prior,panel}.png into --out per expression
(<index>: the expression's position among --expression flags, from 0, or the line number in
--pairs). mask, overlay and prior are at the image's original size (the mask is 0/255); the
panel puts the prediction beside the prior heat map (scale 0..max, with a colour bar) above the
expression. The expressions of one image run in one batch, on one device. Warns, one line
each, about an empty expression, an expression longer than the model's max_text_len tokens
and an empty mask.
"""

from __future__ import annotations

import sys

from absl import flags

from lts_jax import cli

FLAGS = flags.FLAGS
cli.define_flags(config=None, multiprocess=False,
                 workdir_help="Training workdir holding checkpoints/ and config.json.")
flags.DEFINE_string("image", None, "Image file (any format Pillow reads).")
flags.DEFINE_multi_string("expression", None, "Referring expression; repeat for several.")
flags.DEFINE_string("pairs", None, 'JSONL file of {"image": path, "expression": text} lines '
                    "(instead of --image/--expression).")
flags.DEFINE_string("out", None, "Output directory (created if missing).")
flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "Which checkpoint to use.")
flags.DEFINE_string("data_dir", None,
                    "Where the tokenizer lives, if not the data_dir recorded at training.")
flags.mark_flags_as_required(["out"])


def _requests() -> list:
    from lts_jax.predictor import image_requests, read_pairs

    if FLAGS.pairs:
        if FLAGS.image or FLAGS.expression:
            raise ValueError("give either --pairs or --image with --expression, not both")
        return read_pairs(FLAGS.pairs)
    if not FLAGS.image or not FLAGS.expression:
        raise ValueError("give --image and at least one --expression, or --pairs FILE.jsonl")
    return image_requests(FLAGS.image, FLAGS.expression)


def main(argv: list[str]) -> None:
    cli.start(argv)
    from lts_jax.checkpoint import CheckpointUnreadableError
    from lts_jax.predictor import predict_to_files

    try:
        written = predict_to_files(FLAGS.workdir, _requests(), FLAGS.out,
                                   which=FLAGS.checkpoint, data_dir=FLAGS.data_dir)
    except (FileNotFoundError, ValueError, CheckpointUnreadableError) as err:
        cli.fail(err)
    for item in written:
        print(f"{item.request.image.name} {item.request.expression!r}: "
              + ", ".join(str(p) for p in item.paths.values()))
        for warning in item.warnings:
            print(f"predict.py: warning: {item.request.image.name}: {warning}", file=sys.stderr)


if __name__ == "__main__":
    cli.run(main)
