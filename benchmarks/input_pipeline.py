"""Input-pipeline throughput: the CIFAR-10 tfds pipeline on mock data, an image folder, and digits.

The CIFAR-10 source is a tfds mock that serves PNG-encoded 32x32 images from memory, as real tfds
does once it has auto-cached the (small) CIFAR-10 train split, so the figure measures this project's
pipeline (decode, flip, dequantize, batch, numpy) and not the mock's random generator. Images are
smooth random fields (upsampled 8x8 noise) so that PNG decoding costs about what natural images do.
The image folder holds such fields as 40x48 PNG files (read from disk, central crop, resize to 32).

  python benchmarks/input_pipeline.py [--batch_size 128] [--num_batches 100]
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import datasets  # noqa: E402
from configs.default_cifar10_configs import get_default_configs  # noqa: E402


def _throughput(it, batch_size: int, num_batches: int, warmup: int = 5) -> float:
  """Images per second over num_batches after warmup batches."""
  for _ in range(warmup):
    next(it)
  start = time.perf_counter()
  for _ in range(num_batches):
    batch = next(it)
  assert batch['image'].shape[0] == batch_size
  return batch_size * num_batches / (time.perf_counter() - start)


def _mock_cifar(num_examples: int):
  """tfds.testing.mock_data serving PNG-encoded smooth random images from memory."""
  import tensorflow as tf
  import tensorflow_datasets as tfds
  rng = np.random.default_rng(0)
  low = rng.uniform(0, 255, (num_examples, 8, 8, 3)).astype(np.float32)
  images = tf.cast(tf.image.resize(low, [32, 32], method='bicubic'), tf.uint8)
  encoded = tf.map_fn(tf.io.encode_png, images, fn_output_signature=tf.string)
  labels = rng.integers(0, 10, num_examples)

  def as_dataset(self, split, decoders=None, read_config=None, **kwargs):
    del self, split, decoders, read_config, kwargs
    ds = tf.data.Dataset.from_tensor_slices({'image': encoded, 'label': labels})
    return ds.apply(tf.data.experimental.assert_cardinality(num_examples))

  return tfds.testing.mock_data(as_dataset_fn=as_dataset)


def _write_folder(root: str, num_examples: int) -> None:
  """num_examples smooth random 40x48 RGB PNG files in 10 class folders."""
  from PIL import Image
  rng = np.random.default_rng(0)
  for i in range(num_examples):
    low = Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8))
    os.makedirs(os.path.join(root, str(i % 10)), exist_ok=True)
    low.resize((48, 40), Image.BICUBIC).save(os.path.join(root, str(i % 10), f'{i}.png'))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--num_batches', type=int, default=100)
  parser.add_argument('--num_examples', type=int, default=10_000)
  parser.add_argument('--folder_examples', type=int, default=2_000)
  args = parser.parse_args()
  b, nb = args.batch_size, args.num_batches

  config = get_default_configs()
  config.training.batch_size = b
  config.data.random_flip = True
  config.data.uniform_dequantization = True

  config.data.dataset, config.data.image_size, config.data.num_channels = 'digits', 8, 1
  digits = _throughput(datasets.get_dataset(config, process_index=0, process_count=1), b, nb)
  print(f'digits   8x8x1, batch {b}, flip + dequantization: {digits:12,.0f} images/s')

  config.data.dataset, config.data.image_size, config.data.num_channels = 'CIFAR10', 32, 3
  with _mock_cifar(args.num_examples):
    cifar = _throughput(datasets.get_dataset(config, process_index=0, process_count=1), b, nb)
    print(f'CIFAR10 32x32x3, batch {b}, flip + dequantization: {cifar:12,.0f} images/s '
          f'({os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f})')
    # Resume cost: time to the first batch from step 0 and from the middle of an epoch.
    mid = args.num_examples // (2 * b)
    for step in (0, mid):
      start = time.perf_counter()
      next(datasets.get_dataset(config, start_step=step, process_index=0, process_count=1))
      print(f'CIFAR10 first batch at start_step={step:5d} '
            f'({step * b % args.num_examples:6d} examples skipped): '
            f"{time.perf_counter() - start:6.2f} s")


  with tempfile.TemporaryDirectory() as root:
    _write_folder(root, args.folder_examples)
    config.data.dataset, config.data.path = 'folder', root
    folder = _throughput(datasets.get_dataset(config, process_index=0, process_count=1), b, nb)
    print(f'folder  40x48 PNG -> 32x32x3, batch {b}, flip + dequantization: {folder:12,.0f} '
          f'images/s ({args.folder_examples} files, load average {os.getloadavg()[0]:.1f})')


if __name__ == '__main__':
  main()
