"""Where a train step's time goes on XLA:CPU: the step's optimized HLO and a jax.profiler trace.

    python benchmarks/profile_step.py [--config vp/cifar10_ddpmpp_continuous] [--nf 32]
                                      [--batch 8] [--steps 5] [--dump DIR] [--top 25]

Prints (no assertions):
- the HLO of the compiled step: top-level instructions by kind (fusions by emitter: XLA loop
  fusions, YNNPACK / XNNPACK / oneDNN library fusions, convolutions, copies, transposes), and
  the bytes the top-level copies move;
- from a profiler trace of `--steps` steps: wall time per step, process CPU time per step (cores
  busy), and the time of every executed HLO thunk (the XLA:CPU runtime records one event per
  thunk) summed by category: phase (forward, backward, update = optimizer + EMA + skip logic)
  x kind (convolution, matmul, reduction, transpose, copy, random bits, elementwise), per step,
  with the thunk count and the mean time per thunk (small mean = dispatch-bound); and the
  `--top` slowest single thunks. Thunk times include the work a thunk hands to the intra-op
  thread pool only while it waits for it, so the sum over thunks may exceed or fall short of
  the wall time: read the shares, and the wall / CPU times, together.
`--dump DIR` also writes the optimized HLO and the raw trace there.
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import tempfile
import time
from typing import Dict, Tuple

from train_step import build  # also puts the repository root on sys.path

_INSTR = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$')


def parse_hlo(text: str) -> Tuple[Dict[str, dict], Dict[str, collections.Counter]]:
  """(instructions of every computation by name: opcode, shape, called computation, op_name,
  computation, in_entry; the ops of each computation)."""
  comps: Dict[str, collections.Counter] = {}
  instrs: Dict[str, dict] = {}
  current, in_entry = None, False
  for line in text.splitlines():
    if line and not line[0].isspace() and '{' in line and ('(' in line):
      head = line.split('(')[0].split()
      current = head[-1].lstrip('%') if head else None
      in_entry = line.startswith('ENTRY')
      comps[current] = collections.Counter()
      continue
    m = _INSTR.match(line)
    if not m or current is None:
      continue
    name, shape, opcode, rest = m.groups()
    comps[current][opcode] += 1
    called = re.search(r'(?:calls|body)=%?([\w.\-]+)', rest)
    op_name = re.search(r'op_name="([^"]*)"', rest)
    backend = re.search(r'"kind":"(\w+)"', rest)
    instrs[name] = dict(opcode=opcode, shape=shape, called=called and called.group(1),
                        op_name=op_name.group(1) if op_name else '', computation=current,
                        in_entry=in_entry, backend_kind=backend.group(1) if backend else '',
                        fusion_kind=(re.search(r'kind=(\w+)', rest) or [None, ''])[1])
  return instrs, comps


def _nbytes(shape: str) -> int:
  sizes = {'f32': 4, 's32': 4, 'u32': 4, 'f16': 2, 'bf16': 2, 'f64': 8, 'pred': 1, 'u8': 1}
  total = 0
  for dtype, dims in re.findall(r'(\w+)\[([\d,]*)\]', shape):
    n = 1
    for d in filter(None, dims.split(',')):
      n *= int(d)
    total += n * sizes.get(dtype, 4)
  return total


def phase(op_name: str) -> str:
  """forward / backward / update from the jax op_name metadata of an instruction."""
  if 'transpose(jvp(' in op_name:
    return 'backward'
  if 'jvp(' in op_name:
    return 'forward'
  return 'update'


def kind(instr: dict, comps: Dict[str, collections.Counter]) -> str:
  """What an ENTRY instruction computes: convolution, matmul, reduction, transpose, copy, ..."""
  ops = comps.get(instr['called'] or '', collections.Counter())
  ops = ops + collections.Counter({instr['opcode']: 1})
  lib = {'__ynn_fusion': 'YNN ', '__xnn_fusion': 'XNN ', '__onednn_fusion': 'oneDNN '}.get(
      instr['backend_kind'], '')
  if ops['convolution']:
    # A weight gradient's result has the kernel's shape: [kh, kw, cin, cout] with small kh, kw.
    dims = re.search(r'\[(\d+),(\d+),\d+,\d+\]', instr['shape'])
    wgrad = dims and int(dims.group(1)) <= 3 and int(dims.group(2)) <= 3 and phase(instr['op_name']) == 'backward'
    return lib + ('conv weight-grad' if wgrad else 'convolution')
  if ops['dot']:
    return lib + 'matmul'
  if (ops['rng-bit-generator'] or ops['shift-right-logical'] and ops['xor']
      or re.search(r'random_bits|threefry|_uniform|_normal', instr['op_name'])):
    return 'random bits' + ('' if instr['in_entry'] else ' (in a loop)')
  if instr['opcode'] == 'copy':
    return 'copy'
  if ops['reduce'] or ops['reduce-window']:
    return lib + 'reduction'
  if ops['transpose']:
    return lib + 'transpose'
  if ops['copy']:
    return lib + 'copy (layout)'
  return lib + 'elementwise'


def hlo_summary(instrs: Dict[str, dict], comps) -> None:
  counts = collections.Counter()
  entry = {k: v for k, v in instrs.items() if v['in_entry']}
  for instr in entry.values():
    if instr['opcode'] in ('parameter', 'get-tuple-element', 'tuple', 'constant', 'bitcast'):
      continue
    emitter = instr['backend_kind'] or instr['fusion_kind'] or instr['opcode']
    counts[f'{instr["opcode"]} ({emitter})' if instr['opcode'] == 'fusion' else instr['opcode']] += 1
  print('Top-level HLO instructions (thunks) of the step:')
  for k, n in counts.most_common():
    print(f'  {n:6d}  {k}')
  copies = [i for i in entry.values() if i['opcode'] == 'copy']
  print(f'  top-level copies move {sum(_nbytes(i["shape"]) for i in copies) / 2 ** 20:.1f} MiB per step')
  all_ops = collections.Counter()
  for c in comps.values():
    all_ops += c
  print('  inside fusions, all computations: ' + ', '.join(
      f'{op} {all_ops[op]}' for op in ('convolution', 'dot', 'transpose', 'copy', 'reduce')))
  loops = [i for i in instrs.values() if i['opcode'] == 'while']
  print(f'  while loops: {len(loops)} (' + ', '.join(f'{k} {n}' for k, n in collections.Counter(
      kind(i, comps) for i in loops).most_common()) + ')')


def trace_summary(logdir: str, instrs, comps, n_steps: int, top: int) -> None:
  from jax._src.lib import _profile_data
  path = glob.glob(os.path.join(logdir, '**', '*.xplane.pb'), recursive=True)[0]
  plane = _profile_data.ProfileData.from_file(path).find_plane_with_name('/host:CPU')
  per_cat = collections.defaultdict(lambda: [0., 0])
  per_op = collections.defaultdict(float)
  busy_threads = collections.defaultdict(float)
  for line in plane.lines:
    for ev in line.events:
      stats = dict(ev.stats)
      name = stats.get('hlo_op')
      if not name or stats.get('hlo_module', '').find('train_steps') < 0:
        continue
      instr = instrs.get(name)
      cat = (phase(instr['op_name']), kind(instr, comps)) if instr else ('?', name)
      per_cat[cat][0] += ev.duration_ns
      per_cat[cat][1] += 1
      per_op[name] += ev.duration_ns
      busy_threads[line.name] += ev.duration_ns
  total = sum(v[0] for v in per_cat.values())
  threads = ', '.join(f'{k.split("/")[0]} {v / n_steps / 1e6:.0f} ms'
                      for k, v in sorted(busy_threads.items()))
  print(f'\nThunk time by phase x kind, per step (sum over threads {total / n_steps / 1e6:.0f} ms: '
        f'{threads}):')
  print('| phase | kind | ms/step | share | thunks/step | mean us/thunk |')
  print('|---|---|---|---|---|---|')
  for (ph, k), (ns, n) in sorted(per_cat.items(), key=lambda kv: -kv[1][0]):
    print(f'| {ph} | {k} | {ns / n_steps / 1e6:.1f} | {100 * ns / total:.1f}% | {n / n_steps:.0f} | '
          f'{ns / n / 1e3:.1f} |')
  print(f'\nSlowest {top} thunks (ms per step):')
  for name, ns in sorted(per_op.items(), key=lambda kv: -kv[1])[:top]:
    instr = instrs.get(name, {})
    print(f'  {ns / n_steps / 1e6:7.2f}  {name}  {instr.get("shape", "")[:60]}  '
          f'{kind(instr, comps) if instr else ""}  {instr.get("op_name", "")[-90:]}')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='vp/cifar10_ddpmpp_continuous')
  parser.add_argument('--nf', type=int, default=32)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--top', type=int, default=25)
  parser.add_argument('--dump', default='', help='folder for the optimized HLO and the trace')
  parser.add_argument('--from_dump', default='', help='summarise a --dump folder again; no run')
  args = parser.parse_args()
  if args.from_dump:
    with open(os.path.join(args.from_dump, 'step.hlo.txt')) as f:
      instrs, comps = parse_hlo(f.read())
    with open(os.path.join(args.from_dump, 'steps.txt')) as f:
      n_steps = int(f.read())
    hlo_summary(instrs, comps)
    trace_summary(os.path.join(args.from_dump, 'trace'), instrs, comps, n_steps, args.top)
    return

  import jax
  compiled, state, data, info = build(args.config, 1, args.batch, args.nf)
  print(f'{args.config} nf {args.nf} batch {args.batch}: {info["params"]:,} parameters, '
        f'{info["gflops_per_example"] * args.batch:.1f} GFLOP per step, compile {info["compile_s"]:.0f} s, '
        f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}')
  text = compiled.as_text()
  instrs, comps = parse_hlo(text)
  hlo_summary(instrs, comps)
  for _ in range(2):
    state, loss = compiled(state, data)
  jax.block_until_ready(loss)

  t0, c0 = time.perf_counter(), time.process_time()
  for _ in range(args.steps):
    state, loss = compiled(state, data)
    jax.block_until_ready(loss)
  wall, cpu = (time.perf_counter() - t0) / args.steps, (time.process_time() - c0) / args.steps
  print(f'\nuntraced: {wall * 1e3:.0f} ms per step, CPU {cpu * 1e3:.0f} ms per step '
        f'({cpu / wall:.2f} cores busy), {args.batch * args.nf and args.batch / wall:.2f} img/s')

  logdir = os.path.join(args.dump, 'trace') if args.dump else tempfile.mkdtemp(prefix='trace_')
  if args.dump:
    os.makedirs(args.dump, exist_ok=True)
    with open(os.path.join(args.dump, 'step.hlo.txt'), 'w') as f:
      f.write(text)
    with open(os.path.join(args.dump, 'steps.txt'), 'w') as f:
      f.write(str(args.steps))
  jax.profiler.start_trace(logdir)
  for _ in range(args.steps):
    state, loss = compiled(state, data)
    jax.block_until_ready(loss)
  jax.profiler.stop_trace()
  trace_summary(logdir, instrs, comps, args.steps, args.top)


if __name__ == '__main__':
  main()
