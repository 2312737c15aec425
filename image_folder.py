"""Image folders as a data set: listing, decoding and diagnosis of a tree of PNG / JPEG files.

`datasets.py` turns a folder into a tf.data source ('folder' data set); this module holds what is
specific to folders. Layout: every file under the root whose extension is in IMAGE_EXTENSIONS (any
letter case) is an image; hidden files and folders (names starting with '.') are skipped. With
`class_folders`, the root's sub-folders name the classes (labels 0..K-1 in sorted order of the
names; images may lie deeper inside them); images directly in the root (and no sub-folders) are
unlabelled (-1). Files are listed in sorted order of their '/'-separated relative paths, so every
machine sees the same order.

TensorFlow is passed in (`tf`) by the caller, which owns how it is imported (kept off the GPUs).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Callable, List, Tuple

import numpy as np

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')


@dataclasses.dataclass(frozen=True)
class FolderListing:
  """The images of a folder: sorted relative paths, their labels and a digest of the files."""
  root: str  # absolute path of the folder
  files: Tuple[str, ...]  # paths relative to root, '/'-separated, sorted
  labels: Tuple[int, ...]  # class index per file (-1: unlabelled)
  classes: Tuple[str, ...]  # class folder names, sorted (empty: unlabelled)
  digest: str  # sha256 over root and (path, size, mtime) of every image: changes with any file

  @property
  def paths(self) -> List[str]:
    """Absolute paths of the images, in listing order."""
    return [os.path.join(self.root, f) for f in self.files]


def list_images(path: str, class_folders: bool = True) -> FolderListing:
  """Lists the images under `path` (config.data.path); reads names and file sizes only.

  Raises FileNotFoundError when `path` is not a directory; ValueError when it holds no image, or
  when, with class_folders, images lie both in the root and in sub-folders (naming one of each).
  """
  if not path or not os.path.isdir(path):
    raise FileNotFoundError(f'config.data.path={path!r} is not a directory; point it to a folder '
                            'of PNG / JPEG images.')
  root = os.path.abspath(path)
  entries, others = [], []
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    dirnames[:] = [d for d in dirnames if not d.startswith('.')]
    for name in filenames:
      full = os.path.join(dirpath, name)
      if name.startswith('.'):
        continue
      if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
        others.append(full)
        continue
      st = os.stat(full)
      entries.append((os.path.relpath(full, root).replace(os.sep, '/'), st.st_size,
                      st.st_mtime_ns))
  if not entries:
    hint = f'; it holds {len(others)} other files, e.g. {min(others)!r}' if others else ''
    raise ValueError(f'No image ({", ".join(IMAGE_EXTENSIONS)}) under config.data.path={path!r}'
                     f'{hint}.')
  entries.sort()
  files = tuple(e[0] for e in entries)
  classes: Tuple[str, ...] = ()
  labels = (-1,) * len(files)
  in_folders = [f for f in files if '/' in f]
  if class_folders and in_folders:
    loose = [f for f in files if '/' not in f]
    if loose:
      raise ValueError(
          f'{os.path.join(root, loose[0])} lies directly in config.data.path={path!r}, while other '
          f'images lie in class sub-folders (e.g. {os.path.join(root, in_folders[0])}): move the '
          f'{len(loose)} loose image(s) into a class folder, or set '
          'config.data.class_folders=False to read the whole tree without labels.')
    classes = tuple(sorted({f.split('/', 1)[0] for f in files}))
    index = {c: i for i, c in enumerate(classes)}
    labels = tuple(index[f.split('/', 1)[0]] for f in files)
  digest = hashlib.sha256(json.dumps([root, entries]).encode()).hexdigest()
  return FolderListing(root, files, labels, classes, digest)


def decode_fn(tf, channels: int, center_crop: int = 0) -> Callable:
  """{'path', 'label'} tensors -> (uint8 [H, W, channels] image, label), for a tf.data map.

  The image keeps its stored channel count; an image with another count than `channels`, or
  smaller than `center_crop` (when > 0), fails the pipeline with an error naming the file.
  """

  def decode(record):
    img = tf.io.decode_image(tf.io.read_file(record['path']), channels=0, expand_animations=False)
    shape = tf.shape(img)
    checks = [tf.debugging.Assert(tf.equal(shape[2], channels), [tf.strings.join([
        record['path'], ' has ', tf.strings.as_string(shape[2]),
        f' channels; config.data.num_channels={channels}'])])]
    if center_crop:
      checks.append(tf.debugging.Assert(tf.reduce_min(shape[:2]) >= center_crop, [
          tf.strings.join([record['path'],
                           f' is smaller than config.data.center_crop={center_crop}'])]))
    with tf.control_dependencies(checks):
      img = tf.ensure_shape(tf.identity(img), [None, None, channels])
    return img, record['label']

  return decode


def find_problems(tf, listing: FolderListing, channels: int, center_crop: int = 0,
                  max_problems: int = 20) -> List[str]:
  """'path: reason' for each image the pipeline cannot use (unreadable, another channel count than
  `channels`, smaller than center_crop), at most max_problems; decodes every image once, in
  parallel (the diagnosis after a pipeline failure, or a check of a new folder)."""
  paths = listing.paths

  def probe(i, path):
    img = tf.io.decode_image(tf.io.read_file(path), channels=0, expand_animations=False)
    return i, tf.shape(img)

  ds = tf.data.Dataset.from_tensor_slices((np.arange(len(paths)), paths))
  ds = ds.map(probe, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()  # unreadable: dropped
  shapes = {int(i): tuple(int(v) for v in s) for i, s in ds.as_numpy_iterator()}
  problems = []
  for i, path in enumerate(paths):
    if i not in shapes:
      problems.append(f'{path}: not a readable PNG / JPEG image')
    elif shapes[i][2] != channels:
      problems.append(f'{path}: {shapes[i][2]} channel(s), not config.data.num_channels='
                      f'{channels}')
    elif center_crop and min(shapes[i][:2]) < center_crop:
      problems.append(f'{path}: {shapes[i][0]}x{shapes[i][1]} pixels, smaller than '
                      f'config.data.center_crop={center_crop}')
    if len(problems) == max_problems:
      break
  return problems
