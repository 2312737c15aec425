"""The library's XLA:CPU settings: flags measured to speed up its networks on CPUs.

XLA reads XLA_FLAGS once, when JAX starts its first backend, so these flags are added to the
environment when this module is imported (the modules that compile networks import it: losses,
models.utils), and only if no backend has started yet. Rules:

- a flag that the user's own XLA_FLAGS already sets (to any value) is left as the user set it;
- SCORE_SDE_XLA_DEFAULTS=0 in the environment turns every library default off;
- flags are added only for the jaxlib versions they were measured on (`MEASURED_JAXLIB`): XLA
  aborts the process on a flag it does not know, and another version's defaults may differ.

The flags (CPU compiler options only: accelerators ignore them) and why, measured on 2 cores of
an AVX-512 Xeon with `benchmarks/train_step.py --ab` (docs/performance.md has the figures):

- xla_cpu_experimental_ynn_fusion_type=-individual_convolution: this jaxlib sends convolutions,
  matmuls and reductions to YNNPACK; its convolution weight gradient at the networks' shapes runs
  on one core at up to 2.6x the time of XLA's own (Eigen) convolutions. Convolutions go back to
  Eigen, the rest stays on YNNPACK: faster train steps, ODE sampling and likelihoods for every
  network, with losses unchanged to float round-off.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, MutableMapping, Optional

DEFAULT_FLAGS: Dict[str, str] = {
    'xla_cpu_experimental_ynn_fusion_type': '-individual_convolution',
}
MEASURED_JAXLIB = ('0.10.',)  # version prefixes the flags above were measured on
OPT_OUT = 'SCORE_SDE_XLA_DEFAULTS'


def _user_flag_names(xla_flags: str) -> set:
  """Names of the flags set in an XLA_FLAGS string ('--name=value' or '--name' words)."""
  return {w[2:].split('=', 1)[0] for w in xla_flags.split() if w.startswith('--')}


def merged_xla_flags(user_flags: str, defaults: Dict[str, str] = DEFAULT_FLAGS) -> str:
  """XLA_FLAGS with each default added unless `user_flags` already sets that flag."""
  user = _user_flag_names(user_flags)
  added = [f'--{name}={value}' for name, value in defaults.items() if name not in user]
  return ' '.join([user_flags.strip()] * bool(user_flags.strip()) + added)


def apply(environ: Optional[MutableMapping[str, str]] = None) -> bool:
  """Adds the library's XLA:CPU flags to environ['XLA_FLAGS'] where it is safe; True if it did.

  Does nothing when SCORE_SDE_XLA_DEFAULTS=0, for an unmeasured jaxlib version, or once a JAX
  backend has started (XLA would not read the flags any more)."""
  environ = os.environ if environ is None else environ
  if _off(environ.get(OPT_OUT)):
    return False
  import jax._src.xla_bridge as xla_bridge
  import jaxlib
  if not jaxlib.__version__.startswith(MEASURED_JAXLIB):
    return False
  if getattr(xla_bridge, 'backends_are_initialized', lambda: False)():
    logging.getLogger(__name__).info(
        'A JAX backend started before the library was imported: its XLA:CPU defaults are not '
        'applied (import the library first, or set XLA_FLAGS yourself).')
    return False
  user = environ.get('XLA_FLAGS', '')
  merged = merged_xla_flags(user)
  if merged != user:
    environ['XLA_FLAGS'] = merged
  return True


def unroll_threefry_on_cpu(environ: Optional[MutableMapping[str, str]] = None) -> bool:
  """Lowers jax.random's Threefry hash on CPU as straight-line code; True if it did.

  JAX lowers it on CPU as a 5-iteration while loop (smaller programs), which XLA:CPU runs as a
  loop of separate kernels that write the whole state to memory every iteration, and fuses
  poorly: the dropout masks and the training noise cost ~10% of a train step. The unrolled
  lowering, JAX's own for every other platform, computes the same bits in one fused kernel.
  Off with SCORE_SDE_UNROLL_THREEFRY=0 (or SCORE_SDE_XLA_DEFAULTS=0); only for the JAX versions
  it was measured on (private API)."""
  environ = os.environ if environ is None else environ
  if any(_off(environ.get(v)) for v in (OPT_OUT, 'SCORE_SDE_UNROLL_THREEFRY')):
    return False
  import jax
  if not jax.__version__.startswith(MEASURED_JAXLIB):
    return False
  try:
    from jax._src.interpreters import mlir
    from jax._src.random import threefry2x32 as threefry
    mlir.register_lowering(threefry.threefry2x32_p, threefry._threefry2x32_lowering_rule,
                           platform='cpu', inline=False)
  except (ImportError, AttributeError):
    return False
  return True


def _off(value: Optional[str]) -> bool:
  return value is not None and value.strip().lower() in ('0', 'false', 'no', 'off')


APPLIED = apply()
THREEFRY_UNROLLED = unroll_threefry_on_cpu()
