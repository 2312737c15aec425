"""PNG plots of a run's metrics: training curves, evaluation metrics per checkpoint, sweep summaries.

Reads the files the loops write (`metrics.jsonl`: one object per logged step; `results.jsonl`:
one object per evaluated checkpoint) and draws with matplotlib's object-oriented API on the Agg
canvas (no pyplot, no display, no global backend switch). Every PNG is written to a temporary file
and renamed, so a reader never sees a half-written image.

    training_plots(workdir)   -> <workdir>/plots/loss.png  (training and eval loss vs step)
    eval_plots(eval_dir)      -> <eval_dir>/plots/<metric>.png  (loss, bpd, fid, is, kid vs step)

The two hooks above never raise: a plot is a convenience, so a plotting failure is logged as a
warning and the training or evaluation run goes on.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import List, Mapping, Optional, Sequence, Tuple

import numpy as np

Curve = Tuple[Sequence[float], Sequence[float]]  # (steps, values)

EVAL_METRICS = {'loss': 'eval loss', 'bpd': 'bits/dim', 'fid': 'FID', 'is': 'Inception score',
                'kid': 'KID'}


def read_jsonl(path: str) -> List[dict]:
  """The JSON objects of a .jsonl file, one per line; a torn last line (a run killed while writing
  it) and a missing file give what could be read."""
  if not os.path.isfile(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return rows


def series(rows: Sequence[Mapping], key: str, x: str = 'step') -> Curve:
  """(x values, key values) of the rows that hold a finite number for both, sorted by x."""
  pairs = sorted((float(r[x]), float(r[key])) for r in rows
                 if _is_number(r.get(x)) and _is_number(r.get(key)))
  return [p[0] for p in pairs], [p[1] for p in pairs]


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _figure(width: float = 6.4, height: float = 4.0):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(width, height), dpi=100)
  FigureCanvasAgg(fig)
  return fig, fig.add_subplot(1, 1, 1)


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp.{os.getpid()}.png'
  fig.tight_layout()
  fig.savefig(tmp, format='png')
  os.replace(tmp, path)
  return path


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
  """Trailing moving average over `window` points (fewer at the start)."""
  c = np.cumsum(np.insert(values, 0, 0.))
  i = np.arange(1, len(values) + 1)
  lo = np.maximum(i - window, 0)
  return (c[i] - c[lo]) / (i - lo)


def plot_curves(curves: Mapping[str, Curve], path: str, *, title: str = '', ylabel: str = '',
                xlabel: str = 'step', smooth: bool = False) -> Optional[str]:
  """One line per named curve (markers when a curve has few points); log y when all values are
  positive and span more than a factor 20. With `smooth`, long noisy curves are drawn faint with a
  moving average on top. Returns the path, or None when no curve has a point."""
  curves = {k: (np.asarray(x, float), np.asarray(y, float)) for k, (x, y) in curves.items()
            if len(x)}
  if not curves:
    return None
  fig, ax = _figure()
  for label, (x, y) in curves.items():
    marker = 'o' if len(x) <= 30 else None
    if smooth and len(y) > 20:
      line, = ax.plot(x, y, alpha=0.3)
      ax.plot(x, _smooth(y, max(len(y) // 20, 2)), color=line.get_color(), label=label)
    else:
      ax.plot(x, y, marker=marker, label=label)
  values = np.concatenate([y for _, y in curves.values()])
  if np.all(values > 0) and values.max() > 20 * values.min():
    ax.set_yscale('log')
  ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
  ax.grid(True, alpha=0.3)
  if len(curves) > 1 or next(iter(curves)) != ylabel:
    ax.legend(fontsize='small')
  return _save(fig, path)


def plot_bars(values: Mapping[str, float], path: str, *, title: str = '',
              ylabel: str = '') -> Optional[str]:
  """A horizontal bar per named value (e.g. a sweep point's final metric); None when empty."""
  values = {k: float(v) for k, v in values.items() if _is_number(v)}
  if not values:
    return None
  fig, ax = _figure(6.4, 1.2 + 0.35 * len(values))
  names = list(values)
  ax.barh(range(len(names)), [values[n] for n in names])
  ax.set_yticks(range(len(names)), names, fontsize='small')
  ax.invert_yaxis()  # first point on top, as in the summary table
  for i, n in enumerate(names):
    ax.annotate(f'{values[n]:.4g}', (values[n], i), xytext=(3, 0), textcoords='offset points',
                va='center', fontsize='small')
  ax.set(xlabel=ylabel, title=title)
  ax.grid(True, axis='x', alpha=0.3)
  return _save(fig, path)


def training_plots(workdir: str) -> List[str]:
  """<workdir>/plots/loss.png: training loss (and eval loss) vs step from metrics.jsonl."""
  try:
    rows = read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
    curves = {k: series(rows, k) for k in ('training_loss', 'eval_loss')}
    path = plot_curves(curves, os.path.join(workdir, 'plots', 'loss.png'), title='loss',
                       ylabel='loss', smooth=True)
    return [path] if path else []
  except Exception as e:  # pylint: disable=broad-except  (a plot never stops a run)
    logging.warning('Could not plot the training curves of %s: %s', workdir, e)
    return []


def eval_plots(eval_dir: str) -> List[str]:
  """<eval_dir>/plots/<metric>.png for each metric of results.jsonl, vs the checkpoint's step."""
  try:
    rows = read_jsonl(os.path.join(eval_dir, 'results.jsonl'))
    x = 'step' if rows and all('step' in r for r in rows) else 'ckpt'
    written = []
    for key, label in EVAL_METRICS.items():
      path = plot_curves({label: series(rows, key, x)},
                         os.path.join(eval_dir, 'plots', f'{key}.png'), title=label, ylabel=label,
                         xlabel='training step' if x == 'step' else 'checkpoint')
      written += [path] if path else []
    return written
  except Exception as e:  # pylint: disable=broad-except  (a plot never stops a run)
    logging.warning('Could not plot the evaluation results in %s: %s', eval_dir, e)
    return []

