"""Segment your own image: mask, overlay and position-prior heat map per expression.

    python predict.py --workdir runs/refshapes --image photo.jpg \
        --expression "the cup on the left" --expression "the red mug" --out predictions/

Writes <stem>_<index>_<slug>_{mask,overlay,prior}.png into --out for every expression, at
the image's original size (the mask is 0/255). All expressions run in one batch, on one device.
"""

from __future__ import annotations

from absl import app, flags

from lts_jax import cli

FLAGS = flags.FLAGS
cli.define_flags(config=None, multiprocess=False,
                 workdir_help="Training workdir holding checkpoints/ and config.json.")
flags.DEFINE_string("image", None, "Image file (any format Pillow reads).")
flags.DEFINE_multi_string("expression", None, "Referring expression; repeat for several.")
flags.DEFINE_string("out", None, "Output directory (created if missing).")
flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "Which checkpoint to use.")
flags.DEFINE_string("data_dir", None,
                    "Where the tokenizer lives, if not the data_dir recorded at training.")
flags.mark_flags_as_required(["image", "expression", "out"])


def main(argv: list[str]) -> None:
    cli.start(argv)
    from lts_jax.predictor import predict_to_files

    try:
        written = predict_to_files(
            FLAGS.workdir, FLAGS.image, FLAGS.expression, FLAGS.out,
            which=FLAGS.checkpoint, data_dir=FLAGS.data_dir,
        )
    except (FileNotFoundError, ValueError) as err:
        cli.fail(err)
    for expression, paths in zip(FLAGS.expression, written, strict=True):
        print(f"{expression!r}: " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    app.run(main)
