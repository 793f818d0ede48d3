"""A demo page: segment an uploaded image by typed expressions, in the browser.

    pip install -r requirements-demo.txt      # once: gradio (and the test's browser driver)
    python demo.py --workdir runs/refshapes   # then open http://127.0.0.1:7860

Upload an image (or pick a preloaded RefShapes example), type one or more expressions, one
per line, and press Segment. Each expression gets predict.py's panel (mask outline and fill |
position-prior heat map with its colour bar, the expression below), its highest pixel
probability and predict.py's warnings; the mask, overlay, prior and panel PNGs can be
downloaded. --host 0.0.0.0 serves other machines too (there is no login).
"""

from __future__ import annotations

import importlib.util
import os

from absl import flags

from lts_jax import cli

FLAGS = flags.FLAGS
cli.define_flags(config=None, multiprocess=False,
                 workdir_help="Training workdir holding checkpoints/ and config.json.")
flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "Which checkpoint to use.")
flags.DEFINE_string("host", "127.0.0.1", "Address to serve on (0.0.0.0: every interface).")
flags.DEFINE_integer("port", 7860, "Port to serve on.")
flags.DEFINE_string("data_dir", None,
                    "Where the tokenizer (and the RefShapes examples) live, if not the "
                    "data_dir recorded at training.")


def main(argv: list[str]) -> None:
    cli.start(argv)
    # No usage statistics or version checks over the network.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if importlib.util.find_spec("gradio") is None:  # before the (slow) checkpoint load
        cli.fail(ImportError("gradio is not installed; inside .venv run "
                             "pip install -r requirements-demo.txt"))
    from lts_jax import demo_app
    from lts_jax.predictor import load_predictor

    try:
        demo_app.check_port(FLAGS.host, FLAGS.port)
        predictor, step = load_predictor(FLAGS.workdir, which=FLAGS.checkpoint,
                                         data_dir=FLAGS.data_dir)
    except (OSError, ValueError) as err:  # FileNotFoundError is an OSError
        cli.fail(err)
    try:
        demo_app.serve(predictor, step, workdir=FLAGS.workdir, which=FLAGS.checkpoint,
                       host=FLAGS.host, port=FLAGS.port)
    except OSError as err:  # e.g. the port is taken
        cli.fail(err)


if __name__ == "__main__":
    cli.run(main)
