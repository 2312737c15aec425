"""What runs write: the metric log, sample grids, atomic arrays, resumable output folders and the
progress bar. Only process 0 writes (callers pass `is_main`)."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

import numpy as np
from absl import logging

import checkpointing


class MetricLog:
  """metrics.jsonl (one JSON object per logged step) plus TensorBoard events; process 0 writes."""

  def __init__(self, workdir: str, is_main: bool, resume_step: Optional[int] = None):
    self.is_main = is_main
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.writer = None
    if is_main:
      if resume_step is not None:
        self._roll_back(resume_step)
      from clu import metric_writers
      self.writer = metric_writers.create_default_writer(os.path.join(workdir, 'tensorboard'),
                                                         asynchronous=False)

  def _roll_back(self, step: int) -> None:
    """Moves the lines logged after `step` (work lost in a kill since the checkpoint the run
    resumes from) to metrics.rolled_back.jsonl, so that metrics.jsonl has each step once."""
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = [l for l in f if l.strip()]
    later = [l for l in lines if json.loads(l)['step'] > step]
    if later:
      with open(self.path.replace('.jsonl', '.rolled_back.jsonl'), 'a') as f:
        f.writelines(later)
      tmp = self.path + '.tmp'
      with open(tmp, 'w') as f:
        f.writelines(l for l in lines if json.loads(l)['step'] <= step)
      os.replace(tmp, self.path)

  def write(self, step: int, **scalars: float) -> None:
    if not self.is_main:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': int(step), **{k: float(v) for k, v in scalars.items()}}) + '\n')
    self.writer.write_scalars(int(step), scalars)
    self.writer.flush()


def save_samples(samples: np.ndarray, directory: str, name: str = 'sample', *,
                 npz: bool = True) -> str:
  """Writes samples as <name>.npz (unless `npz` is False: the caller keeps them elsewhere) and a
  PNG (an image grid, or a 2-D histogram for points); returns the PNG's path."""
  from PIL import Image
  os.makedirs(directory, exist_ok=True)
  samples = np.asarray(samples)
  if npz:
    np.savez_compressed(os.path.join(directory, f'{name}.npz'), samples=samples)
  path = os.path.join(directory, f'{name}.png')
  if samples.ndim == 4:  # [B, H, W, C] images in [0, 1], in a square grid
    cols = int(np.ceil(np.sqrt(len(samples))))
    rows = np.ones((int(np.ceil(len(samples) / cols)) * cols,) + samples.shape[1:], np.float32)
    rows[:len(samples)] = samples
    return save_grid(rows.reshape((-1, cols) + samples.shape[1:]), path)
  # points: the first two coordinates as a 2-D histogram
  pts = samples.reshape(len(samples), -1)[:, :2]
  lim = np.abs(pts).max() * 1.05 + 1e-6
  hist, _, _ = np.histogram2d(pts[:, 1], pts[:, 0], bins=256, range=[[-lim, lim], [-lim, lim]])
  Image.fromarray((255 * (1 - hist[::-1] / max(hist.max(), 1))).astype(np.uint8)).save(path)
  return path


def save_grid(rows: np.ndarray, path: str) -> str:
  """Writes images [R, C, H, W, ch] in [0, 1] as one PNG grid of R rows of C images, 2 px white
  borders, upscaled to about 256 px high."""
  from PIL import Image
  rows = np.clip(np.asarray(rows, np.float32), 0., 1.)
  r, c, h, w, ch = rows.shape
  grid = np.ones((r * (h + 2) + 2, c * (w + 2) + 2, ch), np.float32)
  for i in range(r):
    for j in range(c):
      grid[2 + i * (h + 2):2 + i * (h + 2) + h, 2 + j * (w + 2):2 + j * (w + 2) + w] = rows[i, j]
  scale = max(1, 256 // grid.shape[0])
  grid = np.kron(grid, np.ones((scale, scale, 1)))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray((255 * (grid[..., 0] if ch == 1 else grid)).round().astype(np.uint8)).save(path)
  return path


def save_npz(path: str, **arrays) -> None:
  """Writes an .npz atomically (temporary file, then rename): a file that exists is complete."""
  tmp = path + '.tmp.npz'
  np.savez_compressed(tmp, **arrays)
  os.replace(tmp, path)


def fresh_outputs(path: str, key: Dict[str, Any], is_main: bool) -> str:
  """Creates the resumable output folder `path` for the outputs that `key` describes (recorded in
  its outputs_of.json); outputs found there of another key (a snapshot replaced when its run was
  extended, other sampling settings) are moved aside to <path>.replaced[.k], never reused.
  All processes call it (a barrier follows process 0's writes)."""
  marker = os.path.join(path, 'outputs_of.json')
  key = json.loads(json.dumps(key))
  if is_main:
    if os.path.exists(marker):
      with open(marker) as f:
        stale = json.load(f) != key
    else:  # absent: a new folder, or one written before markers (assumed to match)
      stale = False
    if stale:
      new, k = path + '.replaced', 1
      while os.path.exists(new):
        k += 1
        new = f'{path}.replaced.{k}'
      os.rename(path, new)
      logging.warning('Moved the outputs of another snapshot or setting aside: %s.', new)
    os.makedirs(path, exist_ok=True)
    with open(marker, 'w') as f:
      json.dump(key, f)
  checkpointing.barrier(f'outputs_{os.path.basename(path)}')
  return path


def progress(is_main: bool, total: int, initial: int = 0, unit: str = 'step'):
  """A tqdm progress bar on process 0 (disabled elsewhere)."""
  from tqdm import tqdm
  return tqdm(total=total, initial=initial, disable=not is_main, unit=unit, dynamic_ncols=True)
