"""Train (and evaluate) LTS: ``python train.py --config configs/<name>.py[:arg] --workdir DIR``.

Rerunning the same command resumes from the workdir's latest checkpoint. Config fields are
overridden with ``--config.<field>=<value>`` (a mistyped field is an error). Several hosts:
add ``--multiprocess`` (plus the coordinator flags where the cluster is not auto-detected).
"""

from __future__ import annotations

import jax
from absl import flags

from lts_jax import cli

FLAGS = flags.FLAGS
cli.define_flags(config="Config file (configs/*.py), optionally ':arg'.", multiprocess=True,
                 workdir_help="Run directory: checkpoints, logs, config.json.")
flags.mark_flag_as_required("config")


def main(argv: list[str]) -> None:
    cli.start(argv)
    # Deferred so that jax.distributed.initialize runs before anything touches a backend.
    from lts_jax.trainer import NonFiniteLossError, final_metrics_table, train_and_evaluate
    from lts_jax.workdir_config import ConfigMismatchError

    try:
        results = train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (NonFiniteLossError, ConfigMismatchError) as err:
        cli.fail(err)
    if results and jax.process_index() == 0:
        print(final_metrics_table(FLAGS.config, results))


if __name__ == "__main__":
    cli.run(main)
