"""Controllable generation on the digits: classifier-free guidance strength vs the digits
classifier's accuracy on class-balanced samples and digits FID, classifier guidance with the
noise-conditional classifier, and the inpainting error of each mask preset on the test split.

    JAX_PLATFORMS=cpu python benchmarks/guidance.py --workdir W [--classifier_workdir C]

W: a run of configs/digits/vp_ddpmpp_cfg.py (`--mode train`); C: a run of
configs/digits/vp_classifier.py. Drives the same evaluators as `--mode eval`
(controllable_run.GuidanceEvaluator / InpaintingEvaluator) on W's newest snapshot, writing their
grids and sample files under W/benchmark_guidance/ (a finished guidance scale is reused), and prints
tables. Inpainting baselines (`_baselines`): the training split's mean image, a random training
image, and the training image nearest on the known pixels. A sampler draws from p(x_unknown |
x_known), so its expected MSE is twice the conditional variance: compare it with the random-image
fill (twice the unconditional variance) and the 1-NN fill (a sample of the empirical conditional),
not with the mean image (the unconditional mean, which no sample attains).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpointing  # noqa: E402
import controllable_generation as cg  # noqa: E402
import controllable_run  # noqa: E402
import datasets  # noqa: E402
import run_lib  # noqa: E402
from configs.digits import vp_ddpmpp_cfg  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _restore(config, workdir):
  run = run_lib.setup(config, workdir)
  snapshots = checkpointing.make_manager(os.path.join(run.workdir, 'checkpoints'))
  ckpt, state = run_lib._restore_snapshot(run, snapshots, None)  # the newest
  return run, state, ckpt


def _guidance_table(config, workdir, out_dir, scales, name):
  config.eval.guidance_scales = tuple(scales)
  run, state, ckpt = _restore(config, workdir)
  evaluator = controllable_run.GuidanceEvaluator(run)
  print(f'\n{name}: snapshot {ckpt} (step {int(state.step)}), {config.eval.num_samples} '
        f'class-balanced samples per scale, {config.sampling.method} '
        f'{config.sampling.get("n_steps", "")} steps')
  print('| w | accuracy | FID | seconds |')
  print('|---|---|---|---|')
  for w in scales:
    config.eval.guidance_scales = (w,)
    t = time.perf_counter()
    r = evaluator.run(state, out_dir)
    g = config.sampling.guidance
    print(f'| {w:g} | {r[f"{g}_w{w:g}_acc"]:.3f} | {r[f"{g}_w{w:g}_fid"]:.2f} | '
          f'{time.perf_counter() - t:.0f} |', flush=True)


def _baselines(train: np.ndarray, images: np.ndarray, mask: np.ndarray, seed: int):
  """Completions of the missing pixels by the training split's mean image (the best constant),
  by a random training image (an unconditional sample), and by the training image nearest to
  each test image on its known pixels (1-NN: a conditional sample of the empirical data)."""
  full = np.broadcast_to(mask, images.shape).reshape(len(images), -1)
  flat_train, flat = train.reshape(len(train), -1), images.reshape(len(images), -1)
  dist = np.stack([((flat_train - x) ** 2 * m).sum(1) for x, m in zip(flat, full)])
  pick = np.random.default_rng(seed).integers(0, len(train), len(images))
  return {'mean image': np.broadcast_to(train.mean(0), images.shape),
          'random image': train[pick], '1-NN on known': train[np.argmin(dist, 1)]}


def _inpainting_table(config, workdir, out_dir, masks):
  config.eval.inpaint_masks = tuple(masks)
  config.eval.inpaint_num_images = 0  # the whole test split
  run, state, _ = _restore(config, workdir)
  evaluator = controllable_run.InpaintingEvaluator(run)
  images, _ = controllable_run.test_images(config)
  train = np.concatenate([b['image'][b['mask'] > 0] for b in datasets.get_dataset(
      config, split='train', evaluation=True)])
  s = config.sampling
  print(f'\nInpainting: {len(images)} test images, PC {s.predictor} + {s.corrector}, '
        f'{run.sde.N} steps; MSE over the missing pixels ([0, 1] units); baselines from the '
        f'{len(train)} training images')
  print('| mask | missing | MSE | mean-image fill | random-image fill | 1-NN fill | seconds |')
  print('|---|---|---|---|---|---|---|')
  for preset in masks:
    config.eval.inpaint_masks = (preset,)
    t = time.perf_counter()
    mse = evaluator.run(state, out_dir)[
        'inpaint_' + preset.replace(':', '_') + '_mse']
    seconds = time.perf_counter() - t
    mask = cg.inpainting_mask(preset, images.shape, seed=config.seed)
    base = {k: controllable_run.missing_mse(v, images, mask)
            for k, v in _baselines(train, images, mask, config.seed).items()}
    print(f'| {preset} | {1 - np.broadcast_to(mask, images.shape).mean():.0%} | {mse:.4f} | '
          + ' | '.join(f'{v:.4f}' for v in base.values()) + f' | {seconds:.0f} |', flush=True)


def main() -> None:
  """Prints the figures."""
  parser = argparse.ArgumentParser()
  parser.add_argument('--workdir', required=True, help='run of configs/digits/vp_ddpmpp_cfg.py')
  parser.add_argument('--classifier_workdir', default='', help='run of configs/digits/vp_classifier.py')
  parser.add_argument('--scales', default='0,0.5,1,2,4')
  parser.add_argument('--classifier_scales', default='0,1,2,4')
  parser.add_argument('--masks', default='left_half,right_half,center,random_pixels:0.5')
  parser.add_argument('--num_samples', type=int, default=500)
  parser.add_argument('--skip', default='', help="comma list of 'cfg', 'classifier', 'inpainting'")
  args = parser.parse_args()
  skip = set(args.skip.split(','))
  out_dir = os.path.join(args.workdir, 'benchmark_guidance')
  os.makedirs(os.path.join(out_dir, 'classifier'), exist_ok=True)

  def config():
    c = vp_ddpmpp_cfg.get_config()
    c.eval.num_samples = args.num_samples
    return c

  if 'cfg' not in skip:
    _guidance_table(config(), args.workdir, out_dir, [float(w) for w in args.scales.split(',')],
                    'Classifier-free guidance (the CFG network)')
  if args.classifier_workdir and 'classifier' not in skip:
    c = config()
    c.sampling.guidance = 'classifier'
    c.sampling.classifier_config = os.path.join(ROOT, 'configs/digits/vp_classifier.py')
    c.sampling.classifier_workdir = args.classifier_workdir
    _guidance_table(c, args.workdir, os.path.join(out_dir, 'classifier'),
                    [float(w) for w in args.classifier_scales.split(',')],
                    'Classifier guidance (the CFG network\'s unconditional score + the noise-'
                    'conditional WRN)')
  if 'inpainting' not in skip:
    _inpainting_table(config(), args.workdir, out_dir, args.masks.split(','))


if __name__ == '__main__':
  main()
