"""The original's released checkpoints (score_sde in JAX, score_sde_pytorch) as this project's
trees.

The original released NCSN++, DDPM++ and DDPM checkpoints (links and the config of each file in
docs/released_checkpoints.md), in two formats, told apart by the file's content:

- score_sde (JAX): a flax 0.3 msgpack of the training state `mutils.State`: `step`,
  `optimizer` {`target`: params, `state`: Adam moments}, `lr`, `model_state`, `ema_rate`,
  `params_ema`, `rng`. Module names are flax's ClassName_k, as here, except the NCSN++ blocks
  `AttnBlockpp_k` and `ResnetBlockDDPMpp_k` (here `AttnBlock_k`, `ResnetBlockDDPM_k`); GroupNorm
  scale and bias are stored with shape (1, 1, 1, C) (flax 0.3.1), here (C,).
- score_sde_pytorch: a `torch.save` dict: `model` (a DataParallel state dict: `module.` prefix,
  modules `all_modules.N` in the order the network calls them, the buffer `sigmas`), `ema`
  (`shadow_params`: the EMA of the parameters that require gradients, in `model.parameters()`
  order; the fixed Fourier features `W` are not among them and come from `model`),
  `optimizer` and `step`. Layouts: conv weight (O, I, kh, kw) -> kernel (kh, kw, I, O), Linear
  weight (out, in) -> Dense kernel (in, out), GroupNorm weight -> scale; NIN `W` is (in, out) in
  both. The file is read by `torch_pickle` (no torch needed, no pickled code run).

FIR kernels are fixed constants of the networks in both implementations (not parameters), and
every network keeps no mutable state, so weights are all there is to convert.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import re
import warnings
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

import torch_pickle

FLAX_MSGPACK, PYTORCH_ZIP, PYTORCH_LEGACY = 'flax-msgpack', 'pytorch-zip', 'pytorch-legacy'
# Networks the original released checkpoints of (NCSN++ and DDPM++ are both 'ncsnpp').
SUPPORTED_MODELS = ('ncsnpp', 'ddpm')
# Every checkpoint folder the original READMEs list -> the config here that goes with its files.
RELEASED_CONFIGS = {
    've/cifar10_ncsnpp': 'configs/ve/cifar10_ncsnpp.py',
    've/cifar10_ncsnpp_continuous': 'configs/ve/cifar10_ncsnpp_continuous.py',
    've/cifar10_ncsnpp_deep_continuous': 'configs/ve/cifar10_ncsnpp_deep_continuous.py',
    'vp/cifar10_ddpm': 'configs/vp/ddpm/cifar10.py',
    'vp/cifar10_ddpm_continuous': 'configs/vp/ddpm/cifar10_continuous.py',
    'vp/cifar10_ddpmpp': 'configs/vp/cifar10_ddpmpp.py',
    'vp/cifar10_ddpmpp_continuous': 'configs/vp/cifar10_ddpmpp_continuous.py',
    'vp/cifar10_ddpmpp_deep_continuous': 'configs/vp/cifar10_ddpmpp_deep_continuous.py',
    'subvp/cifar10_ddpm_continuous': 'configs/subvp/cifar10_ddpm_continuous.py',
    'subvp/cifar10_ddpmpp_continuous': 'configs/subvp/cifar10_ddpmpp_continuous.py',
    'subvp/cifar10_ddpmpp_deep_continuous': 'configs/subvp/cifar10_ddpmpp_deep_continuous.py',
    've/bedroom_ncsnpp_continuous': 'configs/ve/bedroom_ncsnpp_continuous.py',
    've/church_ncsnpp_continuous': 'configs/ve/church_ncsnpp_continuous.py',
    've/ffhq_1024_ncsnpp_continuous': 'configs/ve/ffhq_ncsnpp_continuous.py',
    've/ffhq_256_ncsnpp_continuous': 'configs/ve/ffhq_256_ncsnpp_continuous.py',
    've/celebahq_256_ncsnpp_continuous': 'configs/ve/celebahq_256_ncsnpp_continuous.py',
}
# The original JAX NCSN++ module classes whose names differ here.
_FLAX_RENAMES = {'AttnBlockpp': 'AttnBlock', 'ResnetBlockDDPMpp': 'ResnetBlockDDPM'}

Path = Tuple[str, ...]


def detect_format(path: str) -> str:
  """'flax-msgpack', 'pytorch-zip' or 'pytorch-legacy', from the first bytes of the file.

  Raises FileNotFoundError for a missing file, ValueError for a directory or any other content."""
  if os.path.isdir(path):
    raise ValueError(f'{path} is a directory: pass the checkpoint file inside it (checkpoint_N '
                     f'or checkpoint_N.pth).')
  with open(path, 'rb') as f:
    head = f.read(64)
  if torch_pickle.is_zip(head):
    return PYTORCH_ZIP
  if torch_pickle.is_legacy(head):
    return PYTORCH_LEGACY
  # A msgpack map (fixmap 0x80-0x8f, map16 0xde, map32 0xdf); 0x80 then a protocol number 2-5 is
  # a pickle instead.
  is_pickle = head[:1] == b'\x80' and len(head) > 1 and 2 <= head[1] <= 5
  if head and (0x80 <= head[0] <= 0x8f or head[0] in (0xde, 0xdf)) and not is_pickle:
    return FLAX_MSGPACK
  what = 'is empty' if not head else f'starts with {head[:8]!r}'
  raise ValueError(
      f'{path} is neither a score_sde checkpoint (flax msgpack: the file checkpoint_N of the '
      f'JAX release) nor a score_sde_pytorch one (torch.save: checkpoint_N.pth); it {what}.')


@dataclasses.dataclass
class Layout:
  """What the config's network expects: every parameter's shape, and the order in which the
  network first calls its top-level modules that own parameters (the PyTorch port's order)."""
  shapes: Dict[Path, Tuple[int, ...]]
  order: List[str]


def network_layout(config) -> Layout:
  """The parameter shapes and top-level module call order of config's network (traced only)."""
  import flax.linen as nn
  import jax
  from flax import traverse_util

  from models import utils as mutils
  order: List[str] = []

  def record(next_fun, args, kwargs, context):
    path = context.module.path
    if len(path) == 1 and path[0] not in order:
      order.append(path[0])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    params = jax.eval_shape(lambda rng: mutils.init_model(rng, config)[1], jax.random.PRNGKey(0))
  shapes = {p: tuple(v.shape) for p, v in traverse_util.flatten_dict(params).items()}
  owners = {p[0] for p in shapes}
  return Layout(shapes, [name for name in order if name in owners])


# ------------------------------------------------------------------------------------------------
# Fit check shared by both formats


@dataclasses.dataclass
class _Mismatch:
  path: str  # this project's parameter path, or the file's key when the network has no place for it
  source: Optional[str]  # the file's key, when different from `path`
  got: Optional[Tuple[int, ...]]  # shape in the file (converted to this project's layout)
  want: Optional[Tuple[int, ...]]  # shape the network expects
  note: str = ''  # what the file has there instead, when it helps


def _natural_key(path: Path):
  return [tuple(int(t) if t.isdigit() else t for t in re.split(r'(\d+)', part)) for part in path]


def _raise_mismatches(path: str, config, mismatches: List[_Mismatch], what: str) -> None:
  if not mismatches:
    return
  first = mismatches[0]
  source = f" (in the file: '{first.source}')" if first.source else ''
  got = 'absent' if first.got is None else str(first.got)
  want = 'absent' if first.want is None else str(first.want)
  raise ValueError(
      f"{path} does not fit config model '{config.model.name}' ({what}): parameter "
      f"'{first.path}'{source}: checkpoint shape {got}, network shape {want}{first.note}; "
      f'{len(mismatches)} mismatching parameters in all. Use the config that goes with this '
      f'checkpoint (docs/released_checkpoints.md).')


def _compare(flat: Dict[Path, np.ndarray], layout: Layout, sources: Dict[Path, str]
             ) -> List[_Mismatch]:
  out = []
  for p in sorted(set(flat) | set(layout.shapes), key=_natural_key):
    got = tuple(flat[p].shape) if p in flat else None
    want = layout.shapes.get(p)
    if got != want:
      out.append(_Mismatch('/'.join(p), sources.get(p), got, want))
  return out


def _unflatten(flat: Dict[Path, np.ndarray]) -> Dict[str, Any]:
  from flax import traverse_util
  return traverse_util.unflatten_dict({p: np.asarray(v, np.float32) for p, v in flat.items()})


# ------------------------------------------------------------------------------------------------
# score_sde (flax msgpack)


def _flax_name(name: str) -> str:
  cls, _, index = name.rpartition('_')
  return f'{_FLAX_RENAMES[cls]}_{index}' if index.isdigit() and cls in _FLAX_RENAMES else name


def _from_flax_tree(tree) -> Tuple[Dict[Path, np.ndarray], Dict[Path, str]]:
  """The original's params in this project's names and shapes (flat), and each one's source."""
  from flax import traverse_util
  flat, sources = {}, {}
  for src, value in traverse_util.flatten_dict(tree).items():
    value = np.asarray(value)
    dst = tuple(_flax_name(part) for part in src)
    if (len(dst) > 1 and dst[-2].startswith('GroupNorm_') and dst[-1] in ('scale', 'bias')
        and value.ndim > 1 and all(n == 1 for n in value.shape[:-1])):
      value = value.reshape(value.shape[-1])  # flax 0.3.1 stored (1, 1, 1, C)
    if dst in flat:
      raise ValueError(f"Corrupt checkpoint: both '{sources.get(dst, '/'.join(dst))}' and "
                       f"'{'/'.join(src)}' hold parameter '{'/'.join(dst)}'.")
    flat[dst] = value
    if dst != src:
      sources[dst] = '/'.join(src)
  return flat, sources


def _read_flax(path: str):
  from flax import serialization
  with open(path, 'rb') as f:
    data = f.read()
  try:
    return serialization.msgpack_restore(data)
  except Exception as e:  # pylint: disable=broad-except  (msgpack raises several types)
    raise ValueError(f'{path}: unreadable flax msgpack ({type(e).__name__}: {e}): truncated or '
                     f'corrupt; download it again.') from e


def convert_flax_state(state, path: str, config, layout: Layout) -> Dict[str, Any]:
  """score_sde's training state (a dict as msgpack_restore gives it) -> the import's result."""
  keys = sorted(state) if isinstance(state, dict) else type(state).__name__
  if (not isinstance(state, dict) or 'params_ema' not in state
      or not isinstance(state.get('optimizer'), dict) or 'target' not in state['optimizer']):
    raise ValueError(f'{path}: a msgpack file, but not a score_sde training state (it has '
                     f'{keys}; expected step, optimizer.target, params_ema, ...).')
  if state.get('model_state'):
    raise ValueError(f'{path}: the checkpoint has model_state {sorted(state["model_state"])}; '
                     f'the networks here (NCSN++, DDPM++, DDPM) keep none.')
  out = {}
  for name, tree, what in (('params', state['optimizer']['target'], 'optimizer.target'),
                           ('ema_params', state['params_ema'], 'params_ema')):
    flat, sources = _from_flax_tree(tree)
    _raise_mismatches(path, config, _compare(flat, layout, sources), what)
    out[name] = _unflatten(flat)
  out['step'] = int(np.asarray(state['step']))
  return out


# ------------------------------------------------------------------------------------------------
# score_sde_pytorch (torch.save)


def _torch_leaf(leaf: str, ndim: int):
  """The PyTorch port's name for this project's leaf, and the layout conversion from it."""
  if leaf in ('kernel', 'weight') and ndim == 4:  # nn.Conv2d / up_or_down_sampling.Conv2d
    return 'weight', lambda a: a.transpose(2, 3, 1, 0) if a.ndim == 4 else a
  if leaf == 'kernel' and ndim == 2:  # nn.Linear
    return 'weight', lambda a: a.T if a.ndim == 2 else a
  if leaf == 'scale':  # nn.GroupNorm
    return 'weight', lambda a: a
  return leaf, lambda a: a  # bias; NIN W (in, out) and b; Fourier features W


def _torch_modules(state_dict, path: str):
  """{N: {name inside all_modules.N: array}} in module order, and the other (buffer) entries."""
  keys = list(state_dict)
  if keys and all(k.startswith('module.') for k in keys):  # saved from torch.nn.DataParallel
    state_dict = {k[len('module.'):]: v for k, v in state_dict.items()}
  modules: Dict[int, Dict[str, np.ndarray]] = {}
  others = {}
  for key, value in state_dict.items():
    match = re.fullmatch(r'all_modules\.(\d+)\.(.+)', key)
    if match:
      modules.setdefault(int(match[1]), {})[match[2]] = np.asarray(value)
    else:
      others[key] = value
  if not modules:
    raise ValueError(f'{path}: the model state dict has no all_modules.N entries (keys '
                     f'{keys[:4]}...): not a score_sde_pytorch NCSN++ / DDPM++ / DDPM checkpoint.')
  return dict(sorted(modules.items())), others


def _torch_plan(modules, layout: Layout):
  """Pairs the file's modules with the network's in call order: a list of (this project's path,
  file key, layout conversion), and the mismatches (in network order)."""
  by_module: Dict[str, List[Path]] = {}
  for p in sorted(layout.shapes, key=_natural_key):
    by_module.setdefault(p[0], []).append(p)
  plan, mismatches = [], []
  for name, index in itertools.zip_longest(layout.order, modules):
    entries = dict(modules[index]) if index is not None else {}
    note = f' (the file\'s all_modules.{index} has {sorted(entries)[:6]})' if entries else ''
    for p in by_module.get(name, []):
      torch_name, convert = _torch_leaf(p[-1], len(layout.shapes[p]))
      key = '.'.join(p[1:-1] + (torch_name,))
      source = f'all_modules.{index}.{key}' if index is not None else None
      if key in entries:
        got = tuple(convert(entries.pop(key)).shape)
        plan.append((p, source, convert))
        if got != layout.shapes[p]:
          mismatches.append(_Mismatch('/'.join(p), source, got, layout.shapes[p]))
      else:
        mismatches.append(_Mismatch('/'.join(p), source, None, layout.shapes[p], note))
    for key, value in entries.items():  # left over: the network has no place for them
      mismatches.append(_Mismatch(f'all_modules.{index}.{key}', None, tuple(value.shape), None))
  return plan, mismatches


def _uses_sigmas(config) -> bool:
  """Whether the network reads the noise levels (the `sigmas` buffer of the PyTorch port)."""
  m = config.model
  return bool(m.scale_by_sigma) and (m.name == 'ddpm' or m.embedding_type.lower() == 'positional')


def _check_sigmas(others, path: str, config) -> None:
  from models import utils as mutils
  if 'sigmas' not in others or not _uses_sigmas(config):
    return
  theirs = np.asarray(others['sigmas'], np.float64)
  ours = mutils.get_sigmas(config)
  if theirs.shape != ours.shape or not np.allclose(theirs, ours, rtol=1e-5):
    raise ValueError(
        f'{path}: the checkpoint\'s noise levels (sigmas buffer: {theirs.size} levels from '
        f'{theirs.max():.5g} to {theirs.min():.5g}) differ from the config\'s '
        f'({ours.size} levels from {ours.max():.5g} to {ours.min():.5g}); set '
        f'model.num_scales / sigma_max / sigma_min to the checkpoint\'s.')


def convert_torch_state(state, path: str, config, layout: Layout) -> Dict[str, Any]:
  """score_sde_pytorch's checkpoint (the torch.save dict, tensors as numpy arrays) -> the
  import's result."""
  if not isinstance(state, dict) or not isinstance(state.get('model'), dict):
    keys = sorted(state) if isinstance(state, dict) else type(state).__name__
    raise ValueError(f'{path}: a torch.save file, but not a score_sde_pytorch checkpoint (it has '
                     f'{keys}; expected model, ema, optimizer, step).')
  modules, others = _torch_modules(state['model'], path)
  plan, mismatches = _torch_plan(modules, layout)
  _raise_mismatches(path, config, mismatches, 'model')
  unexpected = sorted(set(others) - {'sigmas'})
  if unexpected:
    raise ValueError(f"{path} does not fit config model '{config.model.name}': the model state "
                     f'dict has entries {unexpected} outside all_modules.')
  _check_sigmas(others, path, config)

  flat_model = {f'all_modules.{i}.{k}': v
                for i, entries in modules.items() for k, v in entries.items()}
  ema = state.get('ema')
  shadow = ema.get('shadow_params') if isinstance(ema, dict) else None
  if shadow is None:
    warnings.warn(f'{path} has no EMA (ema.shadow_params); the raw weights serve as ema_params.')
    flat_ema = flat_model
  else:
    # The EMA covers the parameters that require gradients, in model.parameters() order (the
    # state dict's order): all but the fixed Fourier features (a file whose EMA kept them too
    # pairs with every parameter).
    fixed = {source for p, source, _ in plan if p[0].startswith('GaussianFourierProjection')}
    trainable = [k for k in flat_model if k not in fixed]
    if len(shadow) == len(flat_model):
      trainable = list(flat_model)
    if len(shadow) != len(trainable):
      raise ValueError(f'{path}: the EMA has {len(shadow)} tensors but the model has '
                       f'{len(trainable)} trainable parameters: corrupt or mismatched checkpoint.')
    flat_ema = dict(flat_model)
    for key, value in zip(trainable, shadow):
      value = np.asarray(value)
      if value.shape != flat_model[key].shape:
        raise ValueError(f"{path}: the EMA tensor for '{key}' has shape {value.shape}, the "
                         f'model\'s {flat_model[key].shape}: corrupt or mismatched checkpoint.')
      flat_ema[key] = value
  return {'params': _unflatten({p: convert(flat_model[s]) for p, s, convert in plan}),
          'ema_params': _unflatten({p: convert(flat_ema[s]) for p, s, convert in plan}),
          'step': int(np.asarray(state.get('step', 0)))}


# ------------------------------------------------------------------------------------------------


def import_original(path: str, config) -> Dict[str, Any]:
  """A checkpoint of the original score_sde / score_sde_pytorch as this project's parameters.

  Args:
    path: a released checkpoint file: `checkpoint_N` (score_sde, JAX: a flax msgpack of its
      training state) or `checkpoint_N.pth` (score_sde_pytorch: a torch.save dict); the format
      is detected from the content. torch is not needed and nothing in the file is executed.
    config: the experiment config the checkpoint was trained with (the table in
      docs/released_checkpoints.md); its network (config.model.name 'ncsnpp' for NCSN++ and
      DDPM++, or 'ddpm') must match the file parameter for parameter.

  Returns:
    {'params': raw weights, 'ema_params': EMA weights (what the paper evaluated), 'step': int},
    the trees in this project's names and layouts, float32 numpy arrays of exactly the shapes
    `models.utils.init_model(rng, config)` gives (e.g. conv kernels [kh, kw, in, out]).

  Raises:
    FileNotFoundError: no file at `path`.
    ValueError: config.model.name is not one the original released checkpoints of; the file is
      of neither format, or truncated / corrupt; the file's network does not fit the config's
      (the message names the first mismatching parameter, with the file's key, and both shapes:
      a missing parameter, an extra one, or a shape mismatch); a pickle naming a global outside
      the tensors-and-containers set (torch_pickle.UnsafePickleError, nothing run).
  """
  name = config.model.name
  if name not in SUPPORTED_MODELS:
    raise ValueError(f'config.model.name {name!r}: the original released checkpoints of NCSN++ / '
                     f"DDPM++ ('ncsnpp') and DDPM ('ddpm') networks only; valid choices: "
                     f'{list(SUPPORTED_MODELS)}.')
  fmt = detect_format(path)
  layout = network_layout(config)
  if fmt == FLAX_MSGPACK:
    return convert_flax_state(_read_flax(path), path, config, layout)
  return convert_torch_state(torch_pickle.load(path), path, config, layout)
