"""plots.py: PNGs from metrics.jsonl / results.jsonl, hooks that never stop a run, and the training
and evaluation loops writing them."""
import json
import os

import numpy as np
from PIL import Image

import plots


def _png(path):
  """The PNG as an RGB array (asserts it is a complete PNG with some drawing in it)."""
  with Image.open(path) as im:
    assert im.format == 'PNG'
    x = np.asarray(im.convert('RGB'))
  assert x.shape[0] > 100 and x.shape[1] > 100 and x.std() > 5
  return x


def _write_jsonl(path, rows, torn_tail=''):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.write(''.join(json.dumps(r) + '\n' for r in rows) + torn_tail)


def test_read_and_series(tmp_path):
  path = str(tmp_path / 'm.jsonl')
  _write_jsonl(path, [{'step': 20, 'loss': 2.0}, {'step': 10, 'loss': 1.0},
                      {'step': 30, 'loss': float('nan')}, {'step': 40, 'other': 1.0},
                      {'step': 50, 'loss': True}], torn_tail='{"step": 60, "lo')
  rows = plots.read_jsonl(path)
  assert len(rows) == 5  # the torn last line (a run killed mid-write) is skipped
  assert plots.series(rows, 'loss') == ([10., 20.], [1., 2.])  # sorted; NaN, bool, missing out
  assert plots.read_jsonl(str(tmp_path / 'missing.jsonl')) == []


def test_curves_and_bars(tmp_path):
  steps = np.arange(1, 201)
  path = plots.plot_curves({'a': (steps, 1. / steps), 'b': (steps[:5], np.ones(5))},
                           str(tmp_path / 'c.png'), title='t', ylabel='loss', smooth=True)
  assert path == str(tmp_path / 'c.png')
  _png(path)
  assert plots.plot_curves({'a': ([], [])}, str(tmp_path / 'none.png')) is None
  assert not (tmp_path / 'none.png').exists()
  _png(plots.plot_bars({'x=1': 3., 'x=2': float('nan'), 'x=3': 1.}, str(tmp_path / 'b.png')))
  assert plots.plot_bars({'x': float('nan')}, str(tmp_path / 'nb.png')) is None
  assert [p.name for p in tmp_path.iterdir() if 'tmp' in p.name] == []  # temporaries renamed
  np.testing.assert_allclose(plots._smooth(np.array([1., 2., 3., 4., 5.]), 2),
                             [1., 1.5, 2.5, 3.5, 4.5])


def test_training_and_eval_plots(tmp_path):
  workdir = str(tmp_path)
  _write_jsonl(os.path.join(workdir, 'metrics.jsonl'),
               [{'step': s, 'training_loss': 1. / s} for s in range(1, 50)]
               + [{'step': 50, 'eval_loss': 0.03}])
  assert plots.training_plots(workdir) == [os.path.join(workdir, 'plots', 'loss.png')]
  _png(os.path.join(workdir, 'plots', 'loss.png'))
  eval_dir = os.path.join(workdir, 'eval')
  _write_jsonl(os.path.join(eval_dir, 'results.jsonl'),
               [{'ckpt': c, 'step': 1000 * c, 'loss': 0.1 / c, 'bpd': 6. - c / 10,
                 'fid': 100. / c} for c in (1, 2, 3)])
  written = plots.eval_plots(eval_dir)
  assert sorted(os.path.basename(p) for p in written) == ['bpd.png', 'fid.png', 'loss.png']
  for p in written:
    _png(p)


def test_hooks_never_raise(tmp_path, caplog):
  _write_jsonl(str(tmp_path / 'metrics.jsonl'), [{'step': 1, 'training_loss': 1.}])
  (tmp_path / 'plots').write_text('a file where the plots folder should be')
  assert plots.training_plots(str(tmp_path)) == []
  _write_jsonl(str(tmp_path / 'eval' / 'results.jsonl'), [{'ckpt': 1, 'step': 1, 'fid': 1.}])
  (tmp_path / 'eval' / 'plots').write_text('')
  assert plots.eval_plots(str(tmp_path / 'eval')) == []
  assert caplog.text.count('Could not plot') == 2


def test_loops_write_plots(tmp_path):
  import run_lib
  from tests.test_run_lib import tiny_config
  config = tiny_config(n_iters=2, n_jitted_steps=1, log_freq=1, snapshot_freq=2)
  run_lib.train(config, str(tmp_path))
  _png(tmp_path / 'plots' / 'loss.png')  # at the snapshot
  config.eval.update(enable_loss=True, enable_bpd=False, enable_sampling=False)
  run_lib.evaluate(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'eval' / 'plots')) == ['loss.png']
  _png(tmp_path / 'eval' / 'plots' / 'loss.png')
