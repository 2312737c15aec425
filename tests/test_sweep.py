"""sweep.py: a 2 x 2 toy sweep runs locally to completion and is skipped when run again, the SLURM
job-array script, the summary table and plots, and bad sweeps rejected before anything runs."""
import csv
import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest
from PIL import Image

import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, 'configs/toy/vp_ring2d.py')
SWEEP = os.path.join(ROOT, 'configs/sweeps/toy_2x2.py')
TINY = ['--config.training.n_iters=2', '--config.training.n_jitted_steps=1',
        '--config.training.log_freq=1', '--config.training.snapshot_freq=2',
        '--config.training.snapshot_sampling=False']
NAMES = ['model.nf=32,optim.lr=0.001', 'model.nf=32,optim.lr=0.002',
         'model.nf=64,optim.lr=0.001', 'model.nf=64,optim.lr=0.002']


def _sweep(*args):
  out = subprocess.run([sys.executable, os.path.join(ROOT, 'sweep.py'), *args], cwd=ROOT,
                       env=dict(os.environ, JAX_PLATFORMS='cpu'), capture_output=True, text=True,
                       timeout=900)
  return out.returncode, out.stdout + out.stderr


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """The toy 2 x 2 sweep trained locally (4 main.py runs of 2 steps): (root, output)."""
  root = tmp_path_factory.mktemp('sweep') / 'toy'
  rc, out = _sweep('--config', CONFIG, '--sweep', SWEEP, '--root', str(root), '--mode', 'train',
                   '--quiet', *TINY)
  assert rc == 0, out[-3000:]
  return root, out


def test_local_sweep_runs_every_point(trained):
  root, out = trained
  assert '4 of 4 points ran to completion; 0 skipped' in out
  assert sorted(d for d in os.listdir(root) if '=' in d) == NAMES
  for i, name in enumerate(NAMES):
    point = root / name
    meta = json.loads((point / 'sweep_point.json').read_text())
    assert meta['index'] == i and meta['name'] == name
    nf, lr = name.split(',')
    assert meta['overrides'] == {'model.nf': int(nf.split('=')[1]),
                                 'optim.lr': float(lr.split('=')[1])}
    assert sweep.trained_step(str(point)) == 2
    assert [json.loads(l)['step'] for l in (point / 'metrics.jsonl').read_text().splitlines()] == [1, 2]
    log = (point / 'train.log').read_text()
    assert f'--config.model.nf={nf.split("=")[1]}' in log and 'train: step 2' in log
    assert f'--config.eval.stats_dir={root / "stats"}' in log  # one statistics cache per sweep
    with Image.open(point / 'plots' / 'loss.png') as im:  # written at the snapshot
      assert im.format == 'PNG' and im.size[0] > 100


def test_second_run_skips_finished_points(trained):
  root, _ = trained
  logs = {n: (root / n / 'train.log').read_text() for n in NAMES}
  rc, out = _sweep('--config', CONFIG, '--sweep', SWEEP, '--root', str(root), '--mode', 'train',
                   '--quiet', *TINY)
  assert rc == 0, out[-3000:]
  assert out.count('already finished (train), skipped') == 4 and 'running' not in out
  assert 'All 4 points are finished (train).' in out
  assert {n: (root / n / 'train.log').read_text() for n in NAMES} == logs  # nothing ran
  # More steps asked for: no point is finished any more.
  points = sweep.make_points(CONFIG, sweep.load_sweep(SWEEP), str(root),
                             [*TINY, '--config.training.n_iters=4'])
  assert not any(sweep.is_finished(p, 'train') for p in points)


def test_eval_finished_resolves_the_range_as_evaluation_does(trained):
  """Default eval.begin/end_ckpt (None: the training config's final snapshot) and -1 (newest):
  a point is finished for eval once that snapshot is in results.jsonl."""
  root, _ = trained
  for extra in ([], ['--config.eval.begin_ckpt=-1', '--config.eval.end_ckpt=-1']):
    (point,) = sweep.make_points(CONFIG, sweep.load_sweep(SWEEP)[:1], str(root), [*TINY, *extra])
    results = os.path.join(point.workdir, 'eval', 'results.jsonl')
    assert not os.path.exists(results) and not sweep.is_finished(point, 'eval')
    os.makedirs(os.path.dirname(results))
    try:
      with open(results, 'w') as f:  # snapshot 1 = step 2, the final and the newest one
        f.write(json.dumps({'ckpt': 1, 'step': 2, 'loss': 1.}) + '\n')
      assert sweep.is_finished(point, 'eval')
    finally:
      shutil.rmtree(os.path.dirname(results))


def _script_commands(script):
  """{array index: main.py argv} from the script's case lines."""
  commands = {}
  for line in script.splitlines():
    line = line.strip()
    if line[:1].isdigit() and ') CMD=(' in line:
      index, rest = line.split(') CMD=(', 1)
      commands[int(index)] = shlex.split(rest[:-len(') ;;')])
  return commands


def test_slurm_script(trained, tmp_path):
  root, _ = trained
  fresh = tmp_path / 'fresh'
  rc, out = _sweep('--config', CONFIG, '--sweep', SWEEP, '--root', str(fresh), '--mode', 'train',
                   '--launcher', 'slurm', '--nodes', '2', '--gpus_per_node', '8', '--time',
                   '1:00:00', '--sbatch_option=--account=abc', *TINY)
  assert rc == 0, out[-3000:]
  path = fresh / 'sweep_train.sbatch'
  assert f'sbatch {path}' in out
  script = path.read_text()
  for directive in ('--array=0-3', '--nodes=2', '--ntasks-per-node=1', '--gpus-per-node=8',
                    '--time=1:00:00', '--account=abc', '--job-name=toy_2x2-train'):
    assert f'#SBATCH {directive}\n' in script
  assert 'srun "${CMD[@]}"' in script
  commands = _script_commands(script)
  assert sorted(commands) == [0, 1, 2, 3]
  for i, name in enumerate(NAMES):
    nf, lr = (kv.split('=')[1] for kv in name.split(','))
    assert commands[i] == [sys.executable, os.path.join(ROOT, 'main.py'), f'--config={CONFIG}',
                           f'--workdir={fresh / name}', '--mode=train', *TINY,
                           f'--config.eval.stats_dir={fresh / "stats"}',
                           f'--config.model.nf={nf}', f'--config.optim.lr={lr}']
  # The script runs: array task 2 calls srun with point 2's command (a stand-in srun echoes it).
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / 'srun').write_text('#!/bin/bash\nprintf "%s\\n" "$@"\n')
  (bin_dir / 'srun').chmod(0o755)
  ran = subprocess.run(['bash', str(path)], capture_output=True, text=True, env=dict(
      os.environ, SLURM_ARRAY_TASK_ID='2', PATH=f'{bin_dir}:{os.environ["PATH"]}'))
  assert ran.returncode == 0, ran.stderr
  assert ran.stdout.splitlines() == commands[2]
  # On the trained sweep, only unfinished points become array tasks.
  (root / NAMES[1] / 'checkpoints-meta').rename(root / NAMES[1] / 'moved-away')
  try:
    rc, out = _sweep('--config', CONFIG, '--sweep', SWEEP, '--root', str(root), '--mode',
                     'train', '--launcher', 'slurm', '--max_parallel', '2', *TINY)
  finally:
    (root / NAMES[1] / 'moved-away').rename(root / NAMES[1] / 'checkpoints-meta')
  assert rc == 0, out[-3000:]
  script = (root / 'sweep_train.sbatch').read_text()
  assert '#SBATCH --array=1%2\n' in script and list(_script_commands(script)) == [1]


def test_summary(trained):
  root, _ = trained
  # One point also has evaluation results: its last checkpoint's values enter the table.
  results = root / NAMES[3] / 'eval' / 'results.jsonl'
  results.parent.mkdir(exist_ok=True)
  results.write_text('{"ckpt": 1, "step": 1, "loss": 0.9, "bpd": 3.5, "fid": 12.0}\n'
                     '{"ckpt": 2, "step": 2, "loss": 0.8, "bpd": 3.25, "fid": 10.0}\n')
  try:
    rc, out = _sweep('--summarize', str(root))
  finally:
    results.unlink()
  assert rc == 0, out[-3000:]
  with open(root / 'summary.csv') as f:
    rows = list(csv.DictReader(f))
  assert [r['point'] for r in rows] == NAMES
  assert [(r['model.nf'], r['optim.lr']) for r in rows] == [
      ('32', '0.001'), ('32', '0.002'), ('64', '0.001'), ('64', '0.002')]
  for r, name in zip(rows, NAMES):
    metrics = [json.loads(l) for l in (root / name / 'metrics.jsonl').read_text().splitlines()]
    assert r['step'] == '2' and float(r['training_loss']) == metrics[-1]['training_loss']
  assert (rows[3]['ckpt'], rows[3]['test_loss'], rows[3]['bpd'], rows[3]['fid']) == (
      '2', '0.8', '3.25', '10.0')
  assert rows[0]['fid'] == ''
  md = (root / 'summary.md').read_text().splitlines()
  assert md[0].startswith('| point | model.nf | optim.lr | step | training_loss |')
  assert len([l for l in md if l.startswith('| model.nf=')]) == 4
  for png in ('final_training_loss.png', 'training_loss_vs_step.png', 'final_fid.png',
              'fid_vs_step.png', 'final_bpd.png'):
    with Image.open(root / 'summary_plots' / png) as im:
      assert im.format == 'PNG'
    assert f'(summary_plots/{png})' in (root / 'summary.md').read_text()


def test_grid_names_and_values():
  assert sweep.grid({'a.x': [1, 2], 'b.y': ['u', 'v']}) == [
      {'a.x': 1, 'b.y': 'u'}, {'a.x': 1, 'b.y': 'v'}, {'a.x': 2, 'b.y': 'u'},
      {'a.x': 2, 'b.y': 'v'}]
  with pytest.raises(ValueError, match="'a.x'"):
    sweep.grid({'a.x': []})
  assert sweep.point_name({}) == 'base'
  assert sweep.point_name({'model.ch_mult': (1, 2), 'data.path': '/data/my set/'}) == \
      'model.ch_mult=1-2,data.path=my_set'
  long = sweep.point_name({f'k{i}': 'x' * 20 for i in range(10)})
  assert len(long) == 111
  # Values reach main.py's config exactly (the same ml_collections parsing).
  values = {'optim.lr': 3e-05, 'model.ch_mult': (1, 2, 2), 'training.snapshot_sampling': False,
            'data.path': '/a b/c', 'model.nf': 16}
  digits = os.path.join(ROOT, 'configs/digits/vp_ddpmpp_continuous.py')
  config = sweep.resolve_config(digits, sweep.override_args(values))
  assert (config.optim.lr, config.model.ch_mult, config.training.snapshot_sampling,
          config.data.path, config.model.nf) == (3e-05, (1, 2, 2), False, '/a b/c', 16)


def test_bad_sweeps_fail_before_running(tmp_path):
  bad = tmp_path / 'bad.py'
  bad.write_text("def get_sweep():\n  return [{'optim.lr': 1e-3}, {'optim.lrr': 1e-3}]\n")
  with pytest.raises(ValueError, match=r"point 1 \(optim.lrr=0.001\).*unknown config key.*lrr"):
    sweep.main(['--config', CONFIG, '--sweep', str(bad), '--root', str(tmp_path / 'r'),
                '--mode', 'train'])
  bad.write_text("def get_sweep():\n  return [{'training.n_iters': 'ten'}]\n")
  with pytest.raises(ValueError, match=r"n_iters=ten"):
    sweep.main(['--config', CONFIG, '--sweep', str(bad), '--root', str(tmp_path / 'r'),
                '--mode', 'train'])
  bad.write_text("def get_sweep():\n  return [{'optim.lr': 1e-3}, {'config.optim.lr': 1e-3}]\n")
  with pytest.raises(ValueError, match='same workdir name'):
    sweep.main(['--config', CONFIG, '--sweep', str(bad), '--root', str(tmp_path / 'r'),
                '--mode', 'train'])
  bad.write_text("SWEEP = []\n")
  with pytest.raises(ValueError, match='get_sweep'):
    sweep.main(['--config', CONFIG, '--sweep', str(bad), '--root', str(tmp_path / 'r'),
                '--mode', 'train'])
  with pytest.raises(ValueError, match=r"--training.n_iters=3"):
    sweep.main(['--config', CONFIG, '--sweep', SWEEP, '--root', str(tmp_path / 'r'),
                '--mode', 'train', '--training.n_iters=3'])
  assert not (tmp_path / 'r').exists()  # nothing was written or run


def test_every_sweep_file_resolves():
  sweeps = os.path.join(ROOT, 'configs', 'sweeps')
  for name in sorted(os.listdir(sweeps)):
    if name.endswith('.py') and not name.startswith('__'):
      points = sweep.load_sweep(os.path.join(sweeps, name))
      base = 'configs/toy/vp_ring2d.py' if 'toy' in name else \
          'configs/digits/vp_ddpmpp_continuous.py'
      assert len(sweep.make_points(os.path.join(ROOT, base), points, '/tmp/unused', [])) == \
          len(points)
