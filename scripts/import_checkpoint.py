"""Imports a released checkpoint of the original score_sde / score_sde_pytorch into a workdir.

    python scripts/import_checkpoint.py --config configs/vp/cifar10_ddpmpp_continuous.py \\
        --checkpoint checkpoint_8.pth --workdir runs/vp_ddpmpp_continuous

The file is either format (score_sde's `checkpoint_N`, a flax msgpack, or score_sde_pytorch's
`checkpoint_N.pth`), detected from its content and read without torch and without running any
code from it; --config is the experiment config it was trained with (docs/released_checkpoints.md
has the table), and takes the usual overrides (--config.eval.batch_size=256).

Writes, with this project's orbax checkpointing (what `main.py` reads):
  DIR/checkpoints/N       the snapshot that `--mode eval` (and `--mode sample`) evaluates:
                          N = ceil(step / config.training.snapshot_freq) (at least 1; run_lib.snapshot_number), or --ckpt;
  DIR/checkpoints-meta/S  the same state at its step S, where `--mode train` resumes
                          (fine-tuning: raise --config.training.n_iters above S);
  DIR/imported_from.json  the file, its sha256, format and step, and the config.
The state's ema_params are the checkpoint's EMA weights (the ones the paper evaluated; evaluation
and sampling use them), params its raw weights, step its step; the optimizer state is fresh (Adam
moments zero, learning-rate warmup from the start), and rng comes from config.seed.

Errors (exit status 1, one line): checkpoint dirs in DIR that are not empty (never overwritten),
and every error of checkpointing.import_original (unknown format, truncated file, a network that
does not fit the config: the first mismatching parameter and both shapes).
"""
from __future__ import annotations

import json
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections.config_flags import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'The experiment config the checkpoint goes with.',
                                lock_config=True)
flags.DEFINE_string('checkpoint', None, 'The original checkpoint file (checkpoint_N or '
                    'checkpoint_N.pth).')
flags.DEFINE_string('workdir', None, 'Work directory to write the checkpoints into.')
flags.DEFINE_integer('ckpt', None, 'Snapshot number under DIR/checkpoints (default: ceil(step / '
                     'config.training.snapshot_freq), at least 1, as training numbers it).')
flags.mark_flags_as_required(['config', 'checkpoint', 'workdir'])

SNAPSHOTS, META = 'checkpoints', 'checkpoints-meta'


def _refuse_existing(workdir: str) -> None:
  for name in (SNAPSHOTS, META):
    directory = os.path.join(workdir, name)
    if os.path.isdir(directory) and os.listdir(directory):
      raise ValueError(f'{directory} is not empty: importing would mix the imported checkpoint '
                       f'with existing ones, so nothing was written. Use a new --workdir (or '
                       f'remove that directory).')


def import_checkpoint(config, checkpoint: str, workdir: str, ckpt=None) -> dict:
  """Writes `checkpoint` into `workdir` as described in the module docstring; returns a summary."""
  import jax
  import jax.numpy as jnp

  import checkpointing
  import training
  import original_checkpoints

  workdir = os.path.abspath(workdir)
  if ckpt is not None and int(ckpt) < 0:
    raise ValueError(f'--ckpt must be a snapshot number >= 0, got {ckpt}.')
  _refuse_existing(workdir)
  fmt = original_checkpoints.detect_format(checkpoint)
  imported = checkpointing.import_original(checkpoint, config)
  step = imported['step']
  _, state = training.init_train_state(jax.random.PRNGKey(config.seed), config)
  state = state.replace(step=jnp.asarray(step, state.step.dtype),
                        params=jax.tree_util.tree_map(jnp.asarray, imported['params']),
                        ema_params=jax.tree_util.tree_map(jnp.asarray, imported['ema_params']))
  if ckpt is None:  # the number this project's own training gives the state at `step`
    import run_lib
    ckpt = max(run_lib.snapshot_number(step, config.training.snapshot_freq), 1)
  ckpt = int(ckpt)
  checkpointing.save(checkpointing.make_manager(os.path.join(workdir, SNAPSHOTS)), ckpt, state,
                     info={'step': step})
  checkpointing.save(checkpointing.make_manager(os.path.join(workdir, META)), step, state)
  summary = {'checkpoint': os.path.abspath(checkpoint),
             'sha256': checkpointing.file_sha256(checkpoint),
             'format': fmt, 'step': step, 'ckpt': ckpt, 'config': config.to_dict()}
  with open(os.path.join(workdir, 'imported_from.json'), 'w') as f:
    json.dump(summary, f, indent=1, default=str)
  return summary


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax reports every save stage at INFO
  try:
    summary = import_checkpoint(FLAGS.config, FLAGS.checkpoint, FLAGS.workdir, FLAGS.ckpt)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f'import_checkpoint: {e}')
  workdir, ckpt = os.path.abspath(FLAGS.workdir), summary['ckpt']
  print(f"Imported {summary['format']} checkpoint {FLAGS.checkpoint} (step {summary['step']}) "
        f'into {workdir}: {SNAPSHOTS}/{ckpt} for evaluation and sampling (EMA weights), '
        f"{META}/{summary['step']} for training to resume from.\n"
        f'Evaluate it with: python main.py --config <the same config and overrides> --workdir '
        f'{workdir} --mode eval --config.eval.begin_ckpt={ckpt} --config.eval.end_ckpt={ckpt}')


if __name__ == '__main__':
  app.run(main)
