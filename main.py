"""Entry point: python main.py --config configs/<...>.py --workdir DIR --mode train|eval|sample|stats."""
import os
import re
import sys

# TensorFlow (data pipelines only) must never take an accelerator or flood the log.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags, logging  # noqa: E402
from ml_collections.config_flags import config_flags  # noqa: E402

import configs  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Training / evaluation configuration file.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Work directory (checkpoints, samples, logs, results).')
flags.DEFINE_enum('mode', None, ['train', 'eval', 'sample', 'stats'],
                  'Running mode: train, eval, sample (draw eval.num_samples samples from a '
                  'snapshot), or stats (FID / KID reference statistics of the data).')
flags.DEFINE_string('eval_folder', 'eval', 'Folder under workdir for evaluation results.')
flags.mark_flags_as_required(['config', 'workdir', 'mode'])


def check_config_args(argv) -> None:
  """Raises a ValueError for a --config file without get_config() or a --config.<key> override of
  a key the config does not have (listing the keys of that section), which ml_collections would
  report as a bare AttributeError traceback."""
  args = argv[1:argv.index('--')] if '--' in argv else argv[1:]
  path, keys = None, []
  for i, arg in enumerate(args):
    match = re.fullmatch(r'--?(?:no)?config(\.[^=]+)?(?:=(.*))?', arg)
    if not match:
      continue
    if match.group(1):
      keys.append(match.group(1)[1:])
    else:
      path = match.group(2)
      if path is None and i + 1 < len(args):  # --config FILE
        path = args[i + 1]
  if path is None:
    return  # absl reports the missing flag
  file, _, config_args = path.partition(':')
  if not os.path.isfile(file):
    raise ValueError(f'--config {path}: no file {file!r}.')
  module = configs.load_module(file, '_checked_config')
  if not callable(getattr(module, 'get_config', None)):
    raise ValueError(f'--config {path}: {file} defines no get_config(); pass an experiment config '
                     'file such as configs/digits/vp_ddpmpp_continuous.py.')
  config = module.get_config(*([config_args] if config_args else []))
  for key in keys:
    node, where = config, 'config'
    for part in re.sub(r'\[[^\]]*\]', '', key).split('.'):
      if not hasattr(node, 'keys') or part not in node:
        known = sorted(node.keys()) if hasattr(node, 'keys') else []
        raise ValueError(f'--config.{key}: {where} has no key {part!r}; its keys: {known}.')
      node, where = node[part], f'{where}.{part}'


def parse_flags(argv):
  """absl's flag parsing, after check_config_args: a bad config argument exits 1 with one line."""
  try:
    check_config_args(argv)
  except ValueError as e:
    sys.stderr.write(f'FATAL Flags parsing error: {e}\n')
    sys.exit(1)
  return app.parse_flags_with_usage(argv)


def initialize_distributed() -> None:
  """Joins a multi-process run: explicitly from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID, or by cluster auto-detection (SLURM, Open MPI, Cloud TPU); no-op otherwise."""
  import jax
  num = os.environ.get('JAX_NUM_PROCESSES')
  if num is not None and int(num) > 1:
    missing = [v for v in ('JAX_COORDINATOR_ADDRESS', 'JAX_PROCESS_ID') if v not in os.environ]
    if missing:
      raise ValueError(f'JAX_NUM_PROCESSES={num} needs {missing} set too (coordinator host:port '
                       f'and this process\'s rank in [0, {num})).')
    jax.distributed.initialize(os.environ['JAX_COORDINATOR_ADDRESS'], num_processes=int(num),
                               process_id=int(os.environ['JAX_PROCESS_ID']))
  elif num is None and ('SLURM_NTASKS' in os.environ and int(os.environ['SLURM_NTASKS']) > 1
                        or 'OMPI_COMM_WORLD_SIZE' in os.environ or 'TPU_WORKER_HOSTNAMES' in os.environ):
    jax.distributed.initialize()  # coordinator and ranks from the cluster environment


def main(argv):
  del argv
  initialize_distributed()
  import run_lib
  logging.set_verbosity(logging.INFO)
  # orbax logs every save step by step at INFO: keep only its warnings.
  logging.get_absl_handler().addFilter(
      lambda r: r.levelno >= logging.converter.STANDARD_WARNING or 'orbax' not in r.pathname)
  if FLAGS.mode == 'train':
    result = run_lib.train(FLAGS.config, FLAGS.workdir)
    loss = result['loss']
    print(f'train: step {result["step"]}, '
          + (f'last loss {loss:.5g}' if loss == loss else 'already trained (no steps run)')
          + (' (stopped by SIGTERM; resume by running the same command)' if result['preempted'] else ''))
  elif FLAGS.mode == 'sample':
    s = run_lib.sample(FLAGS.config, FLAGS.workdir)
    print(f'sample: {s["num_samples"]} samples of snapshot {s["ckpt"]} (step {s["step"]}), '
          f'{s["nfe_per_sample"]:.0f} NFE each, {s["seconds"]:.0f} s -> {s["outputs"]}'
          + (f', MSE to the truth {s["mse"]:.4f}' if 'mse' in s else ''))
  elif FLAGS.mode == 'stats':
    import evaluation
    path, stats = evaluation.reference_stats(FLAGS.config, FLAGS.workdir)
    print(f'stats: {int(stats["n"])} images of {FLAGS.config.data.dataset} -> {path}')
  else:
    for r in run_lib.evaluate(FLAGS.config, FLAGS.workdir, FLAGS.eval_folder):
      print('eval: ' + ', '.join(f'{k} {v:.5g}' if isinstance(v, float) else f'{k} {v}' for k, v in r.items()))


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
