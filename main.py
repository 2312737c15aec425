"""Entry point: python main.py --config configs/<...>.py --workdir DIR --mode train|eval."""
import os

# TensorFlow (data pipelines only) must never take an accelerator or flood the log.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags, logging  # noqa: E402
from ml_collections.config_flags import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Training / evaluation configuration file.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Work directory (checkpoints, samples, logs, results).')
flags.DEFINE_enum('mode', None, ['train', 'eval'], 'Running mode: train or eval.')
flags.DEFINE_string('eval_folder', 'eval', 'Folder under workdir for evaluation results.')
flags.mark_flags_as_required(['config', 'workdir', 'mode'])


def main(argv):
  del argv
  import jax
  if int(os.environ.get('JAX_NUM_PROCESSES', '1')) > 1 or 'SLURM_JOB_ID' in os.environ or \
      os.environ.get('TPU_WORKER_HOSTNAMES'):
    jax.distributed.initialize()  # multi-host: coordinator and ranks from the environment
  import run_lib
  logging.set_verbosity(logging.INFO)
  # orbax logs every save step by step at INFO: keep only its warnings.
  logging.get_absl_handler().addFilter(
      lambda r: r.levelno >= logging.converter.STANDARD_WARNING or 'orbax' not in r.pathname)
  if FLAGS.mode == 'train':
    result = run_lib.train(FLAGS.config, FLAGS.workdir)
    print(f'train: step {result["step"]}, last loss {result["loss"]:.5g}'
          + (' (stopped by SIGTERM; resume by running the same command)' if result['preempted'] else ''))
  else:
    for r in run_lib.evaluate(FLAGS.config, FLAGS.workdir, FLAGS.eval_folder):
      print('eval: ' + ', '.join(f'{k} {v:.5g}' if isinstance(v, float) else f'{k} {v}' for k, v in r.items()))


if __name__ == '__main__':
  app.run(main)
