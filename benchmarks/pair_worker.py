"""The worker side of `train_step.py --pair`: serves timed train steps over stdin / stdout.

Imports nothing from the project or from an array library, so that the PyTorch peer
(torch_peer.py, run by another virtual environment) and our own worker share it.

Protocol, one line each way: the worker first prints one JSON object (its `info`: parameter count,
implementation, setup seconds, ...); then for each request line `run N` it runs N steps, each
one waited for, and answers {"times": [s, ...], "wall_s", "cpu_s", "loss", "peak_rss_mb"}, where
cpu_s is the process's CPU time (all threads) over the N steps, so cpu_s / wall_s is the number
of cores it kept busy; `quit` ends it. Replies go to the real stdout; anything else the step
prints goes to stderr.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from typing import Callable


def peak_rss_mb() -> float:
  """This process's peak resident set size (ru_maxrss, KiB on Linux) in MiB."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def serve(step: Callable[[], float], info: dict) -> None:
  """Answers `run N` / `quit` requests on stdin with timed calls of `step` (see the module doc)."""
  out = os.fdopen(os.dup(sys.stdout.fileno()), 'w')
  sys.stdout = sys.stderr  # stray prints must not break the protocol

  def reply(obj: dict) -> None:
    out.write(json.dumps(obj) + '\n')
    out.flush()

  for _ in range(3):  # warm-up: torch's first calls at new shapes take seconds (kernel setup)
    loss = step()
  reply(dict(info, loss=loss, peak_rss_mb=peak_rss_mb()))
  for line in sys.stdin:
    words = line.split()
    if not words or words[0] == 'quit':
      break
    n = int(words[1])
    times, c0, w0 = [], time.process_time(), time.perf_counter()
    for _ in range(n):
      t0 = time.perf_counter()
      loss = step()
      times.append(time.perf_counter() - t0)
    reply(dict(times=times, wall_s=time.perf_counter() - w0, cpu_s=time.process_time() - c0,
               loss=loss, peak_rss_mb=peak_rss_mb()))
