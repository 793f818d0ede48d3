"""Train (and evaluate) LTS: ``python train.py --config configs/<name>.py[:arg] --workdir DIR``.

Rerunning the same command resumes from the workdir's latest checkpoint. Config fields are
overridden with ``--config.<field>=<value>`` (a mistyped field is an error). Several hosts:
add ``--multiprocess`` (plus the coordinator flags where the cluster is not auto-detected).

Exit status: 0 finished; 1 error (one ``train.py: error: ...`` line for what the user can fix:
config, workdir in use, unreadable checkpoints, non-finite loss); 75 (EX_TEMPFAIL) stopped by
SIGTERM after saving a checkpoint: rerun the same command to resume.
"""

from __future__ import annotations

import sys

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
    from lts_jax import trainer
    from lts_jax.checkpoint import CheckpointUnreadableError
    from lts_jax.preemption import PREEMPTED_EXIT_STATUS, Preempted
    from lts_jax.workdir_config import ConfigMismatchError
    from lts_jax.workdir_lock import WorkdirLockedError

    try:
        results = trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except Preempted as stop:
        if jax.process_index() == 0:
            print(f"train.py: {stop}", file=sys.stderr)
        raise SystemExit(PREEMPTED_EXIT_STATUS) from None
    # What the user fixes (our own checks' errors), as one line; anything else is a bug and
    # keeps its traceback.
    except (trainer.NonFiniteLossError, trainer.RunSetupError, ConfigMismatchError,
            WorkdirLockedError, CheckpointUnreadableError) as err:
        cli.fail(err)
    if results and jax.process_index() == 0:
        print(trainer.final_metrics_table(FLAGS.config, results))


if __name__ == "__main__":
    cli.run(main)
