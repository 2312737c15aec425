"""FIR up/down-sampling of NHWC images (StyleGAN2's upfirdn2d and its fused convolutions), in lax.

Every operation is one `upfirdn2d(x, k, up, down, pad)`: upsample by zero
insertion (`up - 1` zeros after every pixel), pad (negative pads crop), filter
with the 2-D FIR kernel `k` (a true convolution), then keep every `down`-th
pixel. It runs as a single depthwise `lax.conv_general_dilated` with input
dilation (zero insertion) and window strides (decimation), so XLA fuses it and
differentiates it to any order.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

_DIMS = ('NHWC', 'HWIO', 'NHWC')


def setup_kernel(k: Sequence[float]) -> np.ndarray:
  """Normalised 2-D FIR kernel: an outer product for a 1-D (separable) `k`, summing to one."""
  k = np.asarray(k, dtype=np.float32)
  if k.ndim == 1:
    k = np.outer(k, k)
  if k.ndim != 2 or k.shape[0] != k.shape[1]:
    raise ValueError(f'FIR kernel must be 1-D or square 2-D, got shape {k.shape}.')
  return k / np.sum(k)


def upfirdn2d(x: Array, k: np.ndarray, up: int = 1, down: int = 1,
              pad: Tuple[int, int] = (0, 0)) -> Array:
  """Zero-insertion upsample by `up`, pad by `pad` (before, after), FIR filter with `k`, decimate by `down`."""
  k = np.asarray(k, np.float32)
  channels = x.shape[-1]
  # A true convolution is a correlation with the flipped kernel; one depthwise filter per channel.
  w = jnp.asarray(np.tile(k[::-1, ::-1, None, None], (1, 1, 1, channels)), x.dtype)
  # lhs_dilation leaves no zeros after the last pixel; upfirdn's zero insertion does (up - 1 of them).
  padding = [(pad[0], pad[1] + up - 1)] * 2
  return jax.lax.conv_general_dilated(x, w, window_strides=(down, down), padding=padding,
                                      lhs_dilation=(up, up), dimension_numbers=_DIMS,
                                      feature_group_count=channels)


def _check_factor(factor: int) -> None:
  if not isinstance(factor, int) or factor < 1:
    raise ValueError(f'factor must be a positive integer, got {factor!r}.')


def upsample_2d(x: Array, k: Optional[Sequence[float]] = None, factor: int = 2,
                gain: float = 1.) -> Array:
  """Upsamples [N, H, W, C] images by `factor` with FIR filter `k` (default: nearest neighbour)."""
  _check_factor(factor)
  k = setup_kernel([1] * factor if k is None else k) * (gain * factor ** 2)
  p = k.shape[0] - factor
  return upfirdn2d(x, k, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x: Array, k: Optional[Sequence[float]] = None, factor: int = 2,
                  gain: float = 1.) -> Array:
  """Downsamples [N, H, W, C] images by `factor` with FIR filter `k` (default: average pooling)."""
  _check_factor(factor)
  k = setup_kernel([1] * factor if k is None else k) * gain
  p = k.shape[0] - factor
  return upfirdn2d(x, k, down=factor, pad=((p + 1) // 2, p // 2))


def upsample_conv_2d(x: Array, w: Array, k: Optional[Sequence[float]] = None, factor: int = 2,
                     gain: float = 1.) -> Array:
  """Fused `upsample_2d` then convolution with `w: [kh, kw, in, out]`, padding once.

  The transposed convolution (stride `factor`, VALID) is a correlation of the
  zero-inserted input, fully padded by kh - 1, with `w`; the FIR filter then
  removes the images of the upsampling and crops to H * factor.
  """
  _check_factor(factor)
  kh, kw = w.shape[0], w.shape[1]
  if kh != kw:
    raise ValueError(f'upsample_conv_2d needs a square kernel, got {kh}x{kw}.')
  k = setup_kernel([1] * factor if k is None else k) * (gain * factor ** 2)
  p = (k.shape[0] - factor) - (kw - 1)
  x = jax.lax.conv_general_dilated(x, w.astype(x.dtype), window_strides=(1, 1),
                                   padding=[(kh - 1, kh - 1)] * 2, lhs_dilation=(factor, factor),
                                   dimension_numbers=_DIMS)
  return upfirdn2d(x, k, pad=((p + 1) // 2 + factor - 1, p // 2 + 1))


def conv_downsample_2d(x: Array, w: Array, k: Optional[Sequence[float]] = None, factor: int = 2,
                       gain: float = 1.) -> Array:
  """Fused convolution with `w: [kh, kw, in, out]` then `downsample_2d`, padding once."""
  _check_factor(factor)
  kh, kw = w.shape[0], w.shape[1]
  if kh != kw:
    raise ValueError(f'conv_downsample_2d needs a square kernel, got {kh}x{kw}.')
  k = setup_kernel([1] * factor if k is None else k) * gain
  p = (k.shape[0] - factor) + (kw - 1)
  x = upfirdn2d(x, k, pad=((p + 1) // 2, p // 2))
  return jax.lax.conv_general_dilated(x, w.astype(x.dtype), window_strides=(factor, factor),
                                      padding='VALID', dimension_numbers=_DIMS)


def naive_upsample_2d(x: Array, factor: int = 2) -> Array:
  """Nearest-neighbour upsampling of [N, H, W, C] images by `factor`."""
  _check_factor(factor)
  n, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (n, h, factor, w, factor, c))
  return x.reshape(n, h * factor, w * factor, c)


def naive_downsample_2d(x: Array, factor: int = 2) -> Array:
  """Average pooling of [N, H, W, C] images over `factor` x `factor` blocks."""
  _check_factor(factor)
  n, h, w, c = x.shape
  return x.reshape(n, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


def _default_kernel_init(key, shape, dtype=jnp.float32):
  """LeCun-normal scale, drawn flat (multi-dimensional draws compile slowly, see layers)."""
  fan_in = int(np.prod(shape[:-1]))
  return jax.random.normal(key, (int(np.prod(shape)),), dtype).reshape(shape) / np.sqrt(fan_in)


class Conv2d(nn.Module):
  """Convolution with optional FIR upsampling or downsampling by 2 (StyleGAN2's fused ops)."""
  fmaps: int
  kernel: int
  up: bool = False
  down: bool = False
  resample_kernel: Sequence[float] = (1, 3, 3, 1)
  use_bias: bool = True
  kernel_init: Optional[Callable[..., Any]] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.up and self.down:
      raise ValueError('Conv2d cannot both upsample and downsample.')
    if self.kernel < 1 or self.kernel % 2 != 1:
      raise ValueError(f'Conv2d kernel must be a positive odd size, got {self.kernel}.')
    init = self.kernel_init or _default_kernel_init
    w = self.param('weight', init, (self.kernel, self.kernel, x.shape[-1], self.fmaps))
    x = x.astype(self.dtype)
    if self.up:
      x = upsample_conv_2d(x, w, k=self.resample_kernel)
    elif self.down:
      x = conv_downsample_2d(x, w, k=self.resample_kernel)
    else:
      x = jax.lax.conv_general_dilated(x, w.astype(x.dtype), (1, 1), 'SAME', dimension_numbers=_DIMS)
    if self.use_bias:
      x = x + self.param('bias', nn.initializers.zeros, (self.fmaps,)).astype(x.dtype)
    return x
