"""Two processes (jax.distributed over localhost, gloo collectives on the CPU) train, sample and
evaluate like one process with the same two devices: each host feeds its half of every global
batch, checkpoints are written jointly, samples and bits/dim are gathered from both hosts."""
import json
import os
import socket
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ['--config', os.path.join(ROOT, 'configs/toy/vp_ring2d.py'),
         '--config.training.batch_size=64', '--config.training.n_iters=20',
         '--config.training.n_jitted_steps=5', '--config.training.log_freq=5',
         '--config.training.eval_freq=10', '--config.training.snapshot_freq=10',
         '--config.training.snapshot_freq_for_preemption=10', '--config.model.nf=32',
         '--config.eval.begin_ckpt=2', '--config.eval.end_ckpt=2', '--config.eval.batch_size=2000',
         '--config.eval.num_samples=200', '--config.eval.enable_sampling=True',
         '--config.eval.enable_bpd=True', '--config.sampling.method=ode']


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _launch(workdir, mode, n_procs, devices_per_proc):
  port = _free_port()
  procs = []
  for rank in range(n_procs):
    env = dict(os.environ, JAX_PLATFORMS='cpu',
               XLA_FLAGS=f'--xla_force_host_platform_device_count={devices_per_proc}')
    if n_procs > 1:
      env.update(JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES=str(n_procs),
                 JAX_PROCESS_ID=str(rank))
    cmd = [sys.executable, os.path.join(ROOT, 'main.py'), *FLAGS, '--workdir', str(workdir),
           f'--mode={mode}']
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  return outs


def test_two_processes_match_one(tmp_path):
  one, two = tmp_path / 'one', tmp_path / 'two'
  for mode in ('train', 'eval'):
    _launch(one, mode, n_procs=1, devices_per_proc=2)
    outs = _launch(two, mode, n_procs=2, devices_per_proc=1)
  assert 'eval: ckpt 2' in outs[0] and 'eval: ckpt 2' in outs[1]  # both hosts computed it
  # Only process 0 writes logs, samples and results.
  lines = lambda d, f: [json.loads(l) for l in open(d / f) if l.strip()]
  m1, m2 = lines(one, 'metrics.jsonl'), lines(two, 'metrics.jsonl')
  assert [m['step'] for m in m1] == [m['step'] for m in m2]
  for a, b in zip(m1, m2):
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-4, err_msg=k)
  r1, r2 = lines(one, 'eval/results.jsonl'), lines(two, 'eval/results.jsonl')
  assert len(r1) == len(r2) == 1
  for k in ('loss', 'bpd'):
    np.testing.assert_allclose(r1[0][k], r2[0][k], rtol=1e-4, err_msg=k)
  # The training snapshot's samples (all 64, gathered from both hosts) and the eval samples.
  for path in ('samples/iter_20/sample.npz', 'eval/ckpt_2/sample.npz'):
    s1, s2 = np.load(one / path)['samples'], np.load(two / path)['samples']
    assert s1.shape == s2.shape and s1.shape[0] in (64, 2000)
    np.testing.assert_allclose(s1, s2, atol=1e-3, err_msg=path)
