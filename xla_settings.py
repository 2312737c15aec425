"""The library's XLA:CPU settings: flags measured to help its networks on CPUs, and memory hygiene.

XLA reads XLA_FLAGS once, when JAX starts its first backend, so these flags are added to the
environment when this module is imported (the modules that compile networks import it:
training, models.utils), and only if no backend has started yet. Rules:

- a flag that the user's own XLA_FLAGS already sets (to any value) is left as the user set it;
- SCORE_SDE_XLA_DEFAULTS=0 in the environment turns every library default off;
- flags are added only for the jaxlib versions they were measured on (`MEASURED_JAXLIB`): XLA
  aborts the process on a flag it does not know, and another version's defaults may differ.

The flags (CPU compiler options: accelerators ignore them) and why, measured on 2 cores of an
AVX-512 Xeon with `benchmarks/train_step.py --ab` (the README's performance section has the
figures; A/B = default / flag, the two alternated in one run, median of per-round ratios):

- xla_cpu_experimental_ynn_fusion_type=-individual_convolution: convolutions go to Eigen instead
  of YNNPACK (the rest stays on YNNPACK). YNN's convolutions, its weight gradients above all, keep
  fewer threads busy: on an otherwise idle machine the flag made the train step 11% (DDPM++ nf 32)
  and 9% (NCSN++ nf 32) faster, the sampler's forward pass 21% and the likelihood's
  forward + JVP 18% faster, at 6-11% more CPU time, with losses unchanged to 6 digits. On a
  machine shared with other jobs, where threads wait for cores anyway, YNN's lower CPU time wins
  (9-33% the other way, measured under heavy contention): set
  `SCORE_SDE_XLA_DEFAULTS=0` there.
- xla_cpu_copy_insertion_use_region_analysis=true: the donated train state is updated in place;
  without it XLA first copies parameters and optimizer leaves (2,149 top-level copies a step at
  nf = 32; 579 -> 115 on the digits DDPM++). Bit-identical results, ~1% less CPU time, less
  memory for temporaries.

Measured and not made defaults: YNNPACK off for reductions (steps 1.9x slower), the legacy
fusion emitters (xla_cpu_use_fusion_emitters=false: ~0.4-0.65 GiB less peak memory at nf = 32,
8-12% slower steps; set it yourself when memory is what limits you), 512-bit vectors (+2.5%,
within noise), the concurrency-optimised scheduler (no change), Threefry unrolled on CPU (4% less
CPU time, +0.14 GiB peak memory).
"""
from __future__ import annotations

import logging
import os
from typing import Dict, MutableMapping, Optional

DEFAULT_FLAGS: Dict[str, str] = {
    'xla_cpu_experimental_ynn_fusion_type': '-individual_convolution',
    'xla_cpu_copy_insertion_use_region_analysis': 'true',
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


def release_freed_memory() -> bool:
  """Returns the heap memory that freed objects left behind to the OS (glibc's malloc_trim).

  XLA:CPU's compilation of a network allocates and frees ~10^6 small objects; glibc keeps the
  freed pages (they are spread over the heap, so its automatic trimming cannot return them): at
  nf = 32 the process holds ~0.5 GiB more after compiling the train step than it uses, and the
  step's own buffers then come on top. Called once after the train step compiles and after
  initialization. A no-op (False) where the C library has no malloc_trim."""
  global _LIBC
  if _LIBC is None:
    try:
      import ctypes
      _LIBC = ctypes.CDLL('libc.so.6')
      _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
      _LIBC = False
  return bool(_LIBC) and bool(_LIBC.malloc_trim(0))


_LIBC = None


def _off(value: Optional[str]) -> bool:
  return value is not None and value.strip().lower() in ('0', 'false', 'no', 'off')


APPLIED = apply()
