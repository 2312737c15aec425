"""FIR resampling against a direct numpy reference written from the definition of upfirdn2d."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import up_or_down_sampling as U

K = [1, 3, 3, 1]


def np_upfirdn2d(x, k, up=1, down=1, pad=(0, 0)):
  """Definition: zero-insert (up - 1 zeros after each pixel), pad, true 2-D convolution, decimate."""
  n, h, w, c = x.shape
  u = np.zeros((n, h * up, w * up, c))
  u[:, ::up, ::up] = x
  u = np.pad(u, [(0, 0), pad, pad, (0, 0)])
  kh, kw = k.shape
  out = np.zeros((n, u.shape[1] - kh + 1, u.shape[2] - kw + 1, c))
  for i in range(out.shape[1]):
    for j in range(out.shape[2]):
      # Convolution: the kernel is flipped relative to the window.
      out[:, i, j] = np.einsum('nabc,ab->nc', u[:, i:i + kh, j:j + kw], k[::-1, ::-1])
  return out[:, ::down, ::down]


def np_kernel(k, scale=1.):
  k = np.outer(k, k).astype(np.float64)
  return k / k.sum() * scale


def np_correlate(x, w, stride=1):
  """VALID cross-correlation (what conv layers compute) of x [N,H,W,I] with w [kh,kw,I,O]."""
  kh = w.shape[0]
  oh = (x.shape[1] - kh) // stride + 1
  out = np.zeros((x.shape[0], oh, oh, w.shape[-1]))
  for i in range(oh):
    for j in range(oh):
      patch = x[:, i * stride:i * stride + kh, j * stride:j * stride + kh]
      out[:, i, j] = np.einsum('nabi,abio->no', patch, w)
  return out


@pytest.fixture(scope='module')
def x():
  return np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype(np.float32)


def test_upfirdn2d_asymmetric_kernel(x):
  k = np.random.default_rng(1).normal(size=(3, 3)).astype(np.float32)  # catches a missing flip
  for up, down, pad in [(1, 1, (1, 1)), (2, 1, (2, 1)), (1, 2, (1, 2)), (3, 1, (0, 2))]:
    np.testing.assert_allclose(U.upfirdn2d(jnp.asarray(x), k, up, down, pad),
                               np_upfirdn2d(x, k, up, down, pad), atol=1e-5)


def test_upsample_and_downsample_2d(x):
  up = U.upsample_2d(jnp.asarray(x), K)
  assert up.shape == (2, 12, 12, 3)
  np.testing.assert_allclose(up, np_upfirdn2d(x, np_kernel(K, 4.), up=2, pad=(2, 1)), atol=1e-5)
  down = U.downsample_2d(jnp.asarray(x), K)
  assert down.shape == (2, 3, 3, 3)
  np.testing.assert_allclose(down, np_upfirdn2d(x, np_kernel(K), down=2, pad=(1, 1)), atol=1e-5)
  # Constant images stay constant away from the (zero-padded) border: the gain is one.
  ones = jnp.ones((1, 8, 8, 1))
  np.testing.assert_allclose(U.upsample_2d(ones, K)[0, 2:-2, 2:-2], 1., atol=1e-6)
  np.testing.assert_allclose(U.downsample_2d(ones, K)[0, 1:-1, 1:-1], 1., atol=1e-6)


def test_default_kernels_are_nearest_and_box(x):
  np.testing.assert_allclose(U.upsample_2d(jnp.asarray(x)), x.repeat(2, 1).repeat(2, 2), atol=1e-6)
  np.testing.assert_allclose(U.naive_upsample_2d(jnp.asarray(x)), x.repeat(2, 1).repeat(2, 2))
  box = x.reshape(2, 3, 2, 3, 2, 3).mean(axis=(2, 4))
  np.testing.assert_allclose(U.downsample_2d(jnp.asarray(x)), box, atol=1e-6)
  np.testing.assert_allclose(U.naive_downsample_2d(jnp.asarray(x)), box, atol=1e-6)


def test_upsample_conv_2d(x):
  w = np.random.default_rng(2).normal(size=(3, 3, 3, 4)).astype(np.float32)
  got = U.upsample_conv_2d(jnp.asarray(x), jnp.asarray(w), K)
  assert got.shape == (2, 12, 12, 4)
  # Transposed conv = correlation of the zero-inserted image (no trailing zeros), padded by 2.
  u = np.zeros((2, 11, 11, 3))
  u[:, ::2, ::2] = x
  t = np_correlate(np.pad(u, [(0, 0), (2, 2), (2, 2), (0, 0)]), w)
  want = np_upfirdn2d(t, np_kernel(K, 4.), pad=(1, 1))
  np.testing.assert_allclose(got, want, atol=1e-4)
  # It is the fused form of upsample_2d followed by a SAME conv (equal away from the border).
  sep = np_correlate(np.pad(np.asarray(U.upsample_2d(jnp.asarray(x), K)),
                            [(0, 0), (1, 1), (1, 1), (0, 0)]), w)
  np.testing.assert_allclose(got[:, 1:-1, 1:-1], sep[:, 1:-1, 1:-1], atol=1e-4)


def test_conv_downsample_2d(x):
  w = np.random.default_rng(3).normal(size=(3, 3, 3, 4)).astype(np.float32)
  got = U.conv_downsample_2d(jnp.asarray(x), jnp.asarray(w), K)
  assert got.shape == (2, 3, 3, 4)
  want = np_correlate(np_upfirdn2d(x, np_kernel(K), pad=(2, 2)), w, stride=2)
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_conv2d_module(x):
  """The module adds its bias to the fused ops (gradients: tests/test_networks.py)."""
  w = np.random.default_rng(4).normal(size=(3, 3, 3, 5)).astype(np.float32)
  b = np.arange(5, dtype=np.float32)
  variables = {'params': {'weight': jnp.asarray(w), 'bias': jnp.asarray(b)}}
  xj = jnp.asarray(x)
  for kw, want in [(dict(up=True), U.upsample_conv_2d(xj, w, K)),
                   (dict(down=True), U.conv_downsample_2d(xj, w, K)),
                   (dict(), np_correlate(np.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)]), w))]:
    conv = U.Conv2d(fmaps=5, kernel=3, **kw)
    shapes = jax.eval_shape(lambda: conv.init(jax.random.PRNGKey(0), xj))['params']
    assert {k: v.shape for k, v in shapes.items()} == {'weight': w.shape, 'bias': b.shape}
    np.testing.assert_allclose(conv.apply(variables, xj), np.asarray(want) + b, atol=1e-4)


def test_bad_arguments(x):
  with pytest.raises(ValueError, match='factor'):
    U.upsample_2d(jnp.asarray(x), K, factor=0)
  with pytest.raises(ValueError, match='kernel'):
    U.Conv2d(fmaps=2, kernel=2).init(jax.random.PRNGKey(0), jnp.asarray(x))
