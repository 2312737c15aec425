"""Sweeps: one config, a list of overrides, one workdir per point; run locally or as a SLURM array.

A sweep is a file `configs/sweeps/<name>.py` whose `get_sweep()` returns a list of override dicts
{dotted config key: value}, one per point; `grid` builds the cartesian product of named axes:

    from sweep import grid
    def get_sweep():
      return grid({'optim.lr': [1e-4, 2e-4], 'model.nf': [64, 128]})

Commands:

    python sweep.py --config CFG --sweep configs/sweeps/<name>.py --root DIR --mode train|eval \\
        [--launcher local|slurm] [--config.training.n_iters=1000 ...]   # overrides for every point
    python sweep.py --summarize DIR

Every point runs the same command, `main.py --config CFG --workdir DIR/<point> --mode MODE
<shared overrides> <point overrides>`; the point's name is made of its overrides
(`optim.lr=0.0001,model.nf=64`) and DIR/<point>/sweep_point.json records them. Before anything
runs, every point's config is resolved exactly as main.py will (ml_collections config flags), so a
misspelled key or a bad value stops the sweep at once, naming the point. Points already finished
are skipped: for train, the latest checkpoint in checkpoints-meta has reached training.n_iters; for
eval, results.jsonl holds every checkpoint eval.begin_ckpt..eval.end_ckpt. Unless a shared
override sets it, every point caches its data statistics in DIR/stats (they depend on the data and
the feature extractor only), so a sweep computes them once.

Launchers: `local` runs the unfinished points one after another (output also in
DIR/<point>/<mode>.log); `slurm` writes DIR/sweep_<mode>.sbatch, a job array with one task per
unfinished point (task i runs point i of the sweep through `srun`, so a multi-node task starts one
process per node and main.py joins them with jax.distributed), and prints how to submit it.
`--summarize` gathers every point's metrics.jsonl and results.jsonl into DIR/summary.csv,
DIR/summary.md and PNG plots in DIR/summary_plots/.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence

import configs
import plots

REPO = os.path.dirname(os.path.abspath(__file__))
MODES = ('train', 'eval')
LAUNCHERS = ('local', 'slurm')
POINT_FILE = 'sweep_point.json'
# Summary columns from each point's files: the last logged training metrics, then the evaluation
# of its last checkpoint ('loss' of results.jsonl is the loss over the whole test split).
TRAIN_COLUMNS = ('step', 'training_loss', 'eval_loss')
RESULT_COLUMNS = {'ckpt': 'ckpt', 'loss': 'test_loss', 'bpd': 'bpd', 'fid': 'fid', 'is': 'is',
                  'kid': 'kid'}


def grid(axes: Mapping[str, Sequence[Any]]) -> List[Dict[str, Any]]:
  """The cartesian product of named axes, the last varying fastest:
  grid({'a': [1, 2], 'b': [3, 4]}) == [{'a': 1, 'b': 3}, {'a': 1, 'b': 4}, {'a': 2, 'b': 3}, ...]."""
  for key, values in axes.items():
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
      raise ValueError(f'Sweep axis {key!r} needs a non-empty list of values, got {values!r}.')
  keys = list(axes)
  return [dict(zip(keys, combo)) for combo in itertools.product(*(axes[k] for k in keys))]


# ------------------------------------------------------------------------------------------------
# Points: loading, naming, resolving


@dataclasses.dataclass
class Point:
  index: int  # position in the sweep (the SLURM array index)
  name: str
  overrides: Dict[str, Any]
  workdir: str
  config: Any  # the resolved ConfigDict, as main.py will see it


def load_sweep(path: str) -> List[Dict[str, Any]]:
  """The override dicts of a sweep file's get_sweep(), validated (keys without 'config.')."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No sweep file {path!r}; a sweep is configs/sweeps/<name>.py.')
  module = configs.load_module(path, f'sweep_{_slug(path)}')
  if not hasattr(module, 'get_sweep'):
    raise ValueError(f'Sweep file {path} defines no get_sweep() returning a list of override '
                     'dicts.')
  points = module.get_sweep()
  if not isinstance(points, (list, tuple)) or not points or not all(
      isinstance(p, Mapping) and all(isinstance(k, str) for k in p) for p in points):
    raise ValueError(f'{path}: get_sweep() must return a non-empty list of dicts {{config key: '
                     f'value}}, got {points!r:.200}.')
  return [{k[len('config.'):] if k.startswith('config.') else k: v for k, v in p.items()}
          for p in points]


def format_value(value: Any) -> str:
  """A Python value as a command-line config override (the syntax ml_collections parses)."""
  if isinstance(value, (list, tuple)):
    return repr(tuple(value))
  return str(value)


def override_args(overrides: Mapping[str, Any]) -> List[str]:
  return [f'--config.{k}={format_value(v)}' for k, v in overrides.items()]


def _slug(text: str) -> str:
  return re.sub(r'[^A-Za-z0-9._+=-]+', '_', text).strip('_')


def point_name(overrides: Mapping[str, Any]) -> str:
  """A directory name made of the overrides: 'optim.lr=0.0001,model.nf=64' ('base' when none)."""
  def short(v):
    if isinstance(v, (list, tuple)):
      return '-'.join(short(x) for x in v) or 'none'
    return os.path.basename(str(v).rstrip('/')) if isinstance(v, str) else str(v)
  name = ','.join(f'{k}={_slug(short(v))}' for k, v in overrides.items()) or 'base'
  if len(name) > 120:  # file systems cap names at 255 bytes: keep it readable and unique
    name = f'{name[:100]}-{hashlib.sha256(name.encode()).hexdigest()[:10]}'
  return name


def resolve_config(config_path: str, args: Sequence[str]):
  """The config main.py gets for `--config config_path *args` (ValueError on a bad override)."""
  from absl import flags
  from ml_collections import config_flags
  argv = ['sweep', f'--config={config_path}', *args]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  try:
    flag_values(argv)
  except (AttributeError, KeyError) as e:  # ml_collections: no such field
    raise ValueError(f'unknown config key {e} in {" ".join(args)}') from e
  except (flags.Error, TypeError, ValueError) as e:
    raise ValueError(f'{e} (in {" ".join(args)})') from e
  return flag_values.config


def make_points(config_path: str, sweep: Sequence[Mapping[str, Any]], root: str,
                shared: Sequence[str]) -> List[Point]:
  """The sweep's points, each config resolved with the shared and its own overrides."""
  points, seen = [], {}
  for i, overrides in enumerate(sweep):
    name = point_name(overrides)
    if name in seen:
      raise ValueError(f'Sweep points {seen[name]} and {i} get the same workdir name {name!r}: '
                       'give them different overrides.')
    seen[name] = i
    try:
      config = resolve_config(config_path, [*shared, *override_args(overrides)])
    except ValueError as e:
      raise ValueError(f'Sweep point {i} ({name}) has a bad override: {e}') from e
    points.append(Point(i, name, dict(overrides), os.path.join(root, name), config))
  return points


def shared_overrides(config_path: str, root: str, extra: Sequence[str]) -> List[str]:
  """The overrides every point gets: the command line's, plus a sweep-wide statistics cache."""
  bad = [a for a in extra if not a.startswith('--config.')]
  if bad:
    raise ValueError(f'Unknown arguments {bad}; sweep.py passes on only --config.<key>=<value>.')
  extra = list(extra)
  config = resolve_config(config_path, extra)
  if 'stats_dir' in config.eval and not any(a.startswith('--config.eval.stats_dir=')
                                            for a in extra):
    extra.append(f'--config.eval.stats_dir={os.path.join(root, "stats")}')
  return extra


# ------------------------------------------------------------------------------------------------
# Finished or not


def trained_step(workdir: str) -> Optional[int]:
  """The step of the latest checkpoint in workdir/checkpoints-meta (None when there is none)."""
  directory = os.path.join(workdir, 'checkpoints-meta')
  if not os.path.isdir(directory):
    return None
  import checkpointing  # lazily: JAX and orbax only when a point has checkpoints
  return checkpointing.make_manager(directory).latest_step()


def is_finished(point: Point, mode: str, eval_folder: str = 'eval') -> bool:
  """Train: its checkpoint reached training.n_iters; eval: every checkpoint begin..end is in
  results.jsonl."""
  c = point.config
  if mode == 'train':
    step = trained_step(point.workdir)
    return step is not None and step >= int(c.training.n_iters)
  done = {r.get('ckpt') for r in plots.read_jsonl(
      os.path.join(point.workdir, eval_folder, 'results.jsonl'))}
  import checkpointing  # lazily, as above
  import run_lib
  directory = os.path.join(point.workdir, 'checkpoints')
  existing = checkpointing.all_steps(checkpointing.make_manager(directory)) if os.path.isdir(
      directory) else []
  begin, end = run_lib.eval_range(c, existing)  # as `main.py --mode eval` resolves them
  return begin is not None and end is not None and set(range(begin, end + 1)) <= done


# ------------------------------------------------------------------------------------------------
# Launchers


def main_command(python: str, config_path: str, point: Point, mode: str, shared: Sequence[str],
                 eval_folder: str) -> List[str]:
  """The point's main.py command line."""
  cmd = [python, os.path.join(REPO, 'main.py'), f'--config={config_path}',
         f'--workdir={point.workdir}', f'--mode={mode}']
  if mode == 'eval':
    cmd.append(f'--eval_folder={eval_folder}')
  return cmd + list(shared) + override_args(point.overrides)


def write_point_files(points: Sequence[Point], sweep_path: str) -> None:
  for p in points:
    os.makedirs(p.workdir, exist_ok=True)
    with open(os.path.join(p.workdir, POINT_FILE), 'w') as f:
      json.dump({'index': p.index, 'name': p.name, 'overrides': p.overrides,
                 'sweep': os.path.abspath(sweep_path)}, f, indent=1, default=repr)


def run_local(points: Sequence[Point], commands: Mapping[str, List[str]], mode: str, *,
              echo: bool = True) -> Dict[str, int]:
  """Runs the commands one after another; returns {point name: exit status}. Each run's output
  goes to <workdir>/<mode>.log (appended) and, with echo, to this process's stdout."""
  status = {}
  for p in points:
    cmd = commands[p.name]
    log_path = os.path.join(p.workdir, f'{mode}.log')
    print(f'[{p.index}] {p.name}: running (log: {log_path})', flush=True)
    with open(log_path, 'ab') as log:
      log.write(f'$ {shlex.join(cmd)}\n'.encode())
      proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
      for chunk in iter(lambda: proc.stdout.read1(1 << 16), b''):
        log.write(chunk)
        if echo:
          sys.stdout.buffer.write(chunk)
          sys.stdout.flush()
      status[p.name] = proc.wait()
    print(f'[{p.index}] {p.name}: ' + ('done' if status[p.name] == 0 else
                                       f'FAILED (exit {status[p.name]}; see {log_path})'),
          flush=True)
  return status


def _ranges(indices: Sequence[int]) -> str:
  """SLURM array syntax for sorted indices: [0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
  groups = itertools.groupby(enumerate(indices), key=lambda t: t[1] - t[0])
  spans = [[i for _, i in g] for _, g in groups]
  return ','.join(f'{s[0]}-{s[-1]}' if len(s) > 1 else str(s[0]) for s in spans)


def slurm_script(points: Sequence[Point], commands: Mapping[str, List[str]], *, job_name: str,
                 log_dir: str, nodes: int = 1, ntasks_per_node: int = 1,
                 gpus_per_node: int = 0, cpus_per_task: int = 0, time: str = '',
                 partition: str = '', max_parallel: int = 0,
                 sbatch_options: Sequence[str] = ()) -> str:
  """An sbatch job-array script: array task i runs point i's main.py command through srun."""
  array = _ranges([p.index for p in points]) + (f'%{max_parallel}' if max_parallel else '')
  directives = [f'--job-name={job_name}', f'--array={array}', f'--nodes={nodes}',
                f'--ntasks-per-node={ntasks_per_node}',
                f'--output={os.path.join(log_dir, "%x_%A_%a.out")}']
  directives += [f'--gpus-per-node={gpus_per_node}'] if gpus_per_node else []
  directives += [f'--cpus-per-task={cpus_per_task}'] if cpus_per_task else []
  directives += [f'--time={time}'] if time else []
  directives += [f'--partition={partition}'] if partition else []
  directives += list(sbatch_options)
  lines = ['#!/bin/bash',
           f'# {len(points)} sweep point(s), one per array task; generated by sweep.py.',
           *[f'#SBATCH {d}' for d in directives],
           'set -euo pipefail',
           f'cd {shlex.quote(REPO)}',
           '# srun starts ntasks-per-node processes on each node; with more than one in all,',
           '# main.py joins them with jax.distributed (SLURM auto-detection).',
           'case "$SLURM_ARRAY_TASK_ID" in']
  for p in points:
    lines.append(f'  {p.index}) CMD=({shlex.join(commands[p.name])}) ;;')
  lines += ['  *) echo "No sweep point for array task $SLURM_ARRAY_TASK_ID" >&2; exit 1 ;;',
            'esac',
            'srun "${CMD[@]}"', '']
  return '\n'.join(lines)


# ------------------------------------------------------------------------------------------------
# Summary


def _point_dirs(root: str, eval_folder: str) -> List[str]:
  dirs = [os.path.join(root, d) for d in sorted(os.listdir(root))
          if os.path.isdir(os.path.join(root, d))]
  return [d for d in dirs if any(os.path.exists(os.path.join(d, f)) for f in (
      POINT_FILE, 'metrics.jsonl', os.path.join(eval_folder, 'results.jsonl')))]


def summarize(root: str, eval_folder: str = 'eval') -> List[Dict[str, Any]]:
  """One row per point of the sweep in `root`; writes summary.csv, summary.md, summary_plots/."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f'No sweep directory {root!r}.')
  rows, histories = [], {}
  for d in _point_dirs(root, eval_folder):
    meta = {}
    if os.path.isfile(os.path.join(d, POINT_FILE)):
      with open(os.path.join(d, POINT_FILE)) as f:
        meta = json.load(f)
    metrics = plots.read_jsonl(os.path.join(d, 'metrics.jsonl'))
    results = plots.read_jsonl(os.path.join(d, eval_folder, 'results.jsonl'))
    row = {'point': os.path.basename(d), **meta.get('overrides', {})}
    for r in metrics:  # the last logged value of each training metric
      row.update({k: r[k] for k in TRAIN_COLUMNS if k in r})
    if results:
      last = max(results, key=lambda r: r.get('ckpt', -1))
      row.update({col: last[k] for k, col in RESULT_COLUMNS.items() if k in last})
    rows.append((meta.get('index', len(rows)), row))
    histories[row['point']] = (metrics, results)
  rows = [r for _, r in sorted(rows, key=lambda ir: ir[0])]
  if not rows:
    raise ValueError(f'No sweep point (a folder with {POINT_FILE}, metrics.jsonl or '
                     f'{eval_folder}/results.jsonl) in {root}.')
  columns = list(dict.fromkeys(k for r in rows for k in r))
  with open(os.path.join(root, 'summary.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
  images = _summary_plots(root, rows, histories)
  with open(os.path.join(root, 'summary.md'), 'w') as f:
    f.write(_markdown(rows, columns))
    f.write(''.join(f'\n![{os.path.basename(p)}]({os.path.relpath(p, root)})\n' for p in images))
  return rows


def _cell(v: Any) -> str:
  return f'{v:.5g}' if isinstance(v, float) else str(v)


def _markdown(rows: Sequence[Mapping], columns: Sequence[str]) -> str:
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  lines += ['| ' + ' | '.join(_cell(r.get(c, '')) for c in columns) + ' |' for r in rows]
  return '\n'.join(lines) + '\n'


def _summary_plots(root: str, rows: Sequence[Mapping], histories: Mapping) -> List[str]:
  """Final value of each metric per point (bars) and each metric vs step per point (lines)."""
  out_dir = os.path.join(root, 'summary_plots')
  written = []
  metric_cols = [c for c in ('training_loss', 'eval_loss', *RESULT_COLUMNS.values())
                 if c != 'ckpt' and any(c in r for r in rows)]
  for col in metric_cols:
    path = plots.plot_bars({r['point']: r[col] for r in rows if col in r},
                           os.path.join(out_dir, f'final_{col}.png'), title=f'final {col}',
                           ylabel=col)
    written += [path] if path else []
  for col in metric_cols:
    key = {v: k for k, v in RESULT_COLUMNS.items()}.get(col, col)
    curves = {name: plots.series(results if col in RESULT_COLUMNS.values() else metrics, key)
              for name, (metrics, results) in histories.items()}
    path = plots.plot_curves(curves, os.path.join(out_dir, f'{col}_vs_step.png'),
                             title=f'{col} vs step', ylabel=col,
                             smooth=col == 'training_loss')
    written += [path] if path else []
  return written


# ------------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      description='Run a sweep of main.py over config overrides, or summarize one.',
      epilog='Any --config.<key>=<value> argument is passed on to every point.')
  p.add_argument('--config', help='the base config file (as for main.py)')
  p.add_argument('--sweep', help='the sweep file, configs/sweeps/<name>.py')
  p.add_argument('--root', help='directory of the sweep: one workdir per point')
  p.add_argument('--mode', choices=MODES, help='main.py mode of every point')
  p.add_argument('--launcher', choices=LAUNCHERS, default='local')
  p.add_argument('--eval_folder', default='eval', help='as main.py --eval_folder')
  p.add_argument('--python', default=sys.executable, help='Python that runs main.py')
  p.add_argument('--quiet', action='store_true', help='local: output to the logs only')
  p.add_argument('--summarize', metavar='DIR', help='gather the results of the sweep in DIR')
  s = p.add_argument_group('slurm launcher')
  s.add_argument('--nodes', type=int, default=1, help='nodes per point')
  s.add_argument('--ntasks_per_node', type=int, default=1, help='processes per node')
  s.add_argument('--gpus_per_node', type=int, default=0)
  s.add_argument('--cpus_per_task', type=int, default=0)
  s.add_argument('--time', default='', help='time limit per point, e.g. 2-00:00:00')
  s.add_argument('--partition', default='')
  s.add_argument('--max_parallel', type=int, default=0, help='array tasks running at once')
  s.add_argument('--sbatch_option', action='append', default=[],
                 help='extra #SBATCH directive, e.g. --sbatch_option=--account=abc (repeatable)')
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = _parser()
  args, extra = parser.parse_known_args(argv)
  if args.summarize:
    rows = summarize(args.summarize, args.eval_folder)
    print(_markdown(rows, list(dict.fromkeys(k for r in rows for k in r))))
    print(f'Wrote {os.path.join(args.summarize, "summary.csv")}, summary.md and summary_plots/.')
    return 0
  missing = [f'--{k}' for k in ('config', 'sweep', 'root', 'mode') if not getattr(args, k)]
  if missing:
    parser.error(f'{", ".join(missing)} required (or --summarize DIR)')
  config_path, root = os.path.abspath(args.config), os.path.abspath(args.root)
  shared = shared_overrides(config_path, root, extra)
  points = make_points(config_path, load_sweep(args.sweep), root, shared)
  write_point_files(points, args.sweep)
  todo = []
  for p in points:
    if is_finished(p, args.mode, args.eval_folder):
      print(f'[{p.index}] {p.name}: already finished ({args.mode}), skipped')
    else:
      todo.append(p)
  commands = {p.name: main_command(args.python, config_path, p, args.mode, shared,
                                   args.eval_folder) for p in todo}
  if not todo:
    print(f'All {len(points)} points are finished ({args.mode}).')
    return 0
  if args.launcher == 'local':
    status = run_local(todo, commands, args.mode, echo=not args.quiet)
    failed = [name for name, rc in status.items() if rc]
    print(f'{len(todo) - len(failed)} of {len(todo)} points ran to completion'
          + (f'; failed: {failed}' if failed else '') + f'; {len(points) - len(todo)} skipped.')
    return 1 if failed else 0
  name = os.path.splitext(os.path.basename(args.sweep))[0]
  script = slurm_script(todo, commands, job_name=f'{name}-{args.mode}',
                        log_dir=os.path.join(root, 'slurm'), nodes=args.nodes,
                        ntasks_per_node=args.ntasks_per_node, gpus_per_node=args.gpus_per_node,
                        cpus_per_task=args.cpus_per_task, time=args.time,
                        partition=args.partition, max_parallel=args.max_parallel,
                        sbatch_options=args.sbatch_option)
  os.makedirs(os.path.join(root, 'slurm'), exist_ok=True)
  path = os.path.join(root, f'sweep_{args.mode}.sbatch')
  with open(path, 'w') as f:
    f.write(script)
  print(f'Wrote {path}: a job array of {len(todo)} task(s) ({len(points) - len(todo)} finished '
        f'point(s) left out). Submit it with:\n  sbatch {shlex.quote(path)}')
  if args.mode == 'train':
    print('For evaluation, run this command again with --mode eval and submit its script with '
          'sbatch --dependency=afterok:<job id of this array>.')
  return 0


if __name__ == '__main__':
  sys.exit(main())
