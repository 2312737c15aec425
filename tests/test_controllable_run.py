"""The config path of controllable generation: config checks before any work, the sample mode
with classifier-free guidance of a trained toy network, and the digits evaluators' wiring."""
import json
import os

import jax
import numpy as np
import pytest

import checkpointing
import controllable_generation as cg
import controllable_run
import mixtures
import run_lib
from configs import presets
from configs.digits import vp_classifier, vp_ddpmpp_cfg, vp_ddpmpp_continuous
from tests.test_run_lib import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_config_checks_name_the_bad_field(tmp_path):
  config = vp_ddpmpp_cfg.get_config()
  assert controllable_run.check_config(config) is None
  bad = [('guidance', 'clip', r"config.sampling.guidance 'clip'.*'none', 'classifier', 'cfg'"),
         ('task', 'upscale', r"config.sampling.task 'upscale'.*'sample', 'inpaint', 'colorize'"),
         ('guidance_scale', -1., r'guidance_scale must be >= 0, got -1.0'),
         ('labels', '3,11', r'labels \[11\] lie outside the valid class ids \[0, 10\)'),
         ('labels', 'odd', r"give 'all' or class ids")]
  for field, value, match in bad:
    config = vp_ddpmpp_cfg.get_config()
    config.sampling[field] = value
    with pytest.raises(ValueError, match=match):
      controllable_run.check_config(config)
  config = vp_ddpmpp_cfg.get_config()
  config.sampling.task, config.sampling.mask = 'inpaint', 'top_half'
  with pytest.raises(ValueError, match="mask preset 'top_half'"):
    controllable_run.check_config(config)
  config.sampling.task = 'colorize'
  with pytest.raises(ValueError, match=r"'colorize' needs RGB images.*\(8, 8, 1\)"):
    controllable_run.check_config(config)
  config = vp_ddpmpp_continuous.get_config()
  config.sampling.guidance = 'cfg'
  with pytest.raises(ValueError, match='class-conditional network.*num_classes'):
    controllable_run.check_config(config)
  config.sampling.guidance = 'classifier'
  config.sampling.classifier_config = 'configs/digits/nope.py'
  with pytest.raises(ValueError, match="classifier_config='configs/digits/nope.py' is not a config file"):
    controllable_run.check_config(config)
  config.sampling.classifier_config = os.path.join(ROOT, 'configs/digits/vp_ddpmpp_cfg.py')
  with pytest.raises(ValueError, match="is not a classifier config"):
    controllable_run.check_config(config)
  config.sampling.classifier_config = os.path.join(ROOT, 'configs/digits/vp_classifier.py')
  config.sampling.classifier_workdir = str(tmp_path)
  with pytest.raises(ValueError, match='has no checkpoints/; train the classifier'):
    controllable_run.check_config(config)
  config = presets.ve(vp_ddpmpp_continuous.get_config(), continuous=True)
  config.sampling.guidance = 'classifier'
  config.sampling.classifier_config = os.path.join(ROOT, 'configs/digits/vp_classifier.py')
  with pytest.raises(ValueError, match='trained under VPSDE.*VESDE'):
    controllable_run.check_config(config)
  assert vp_classifier.get_config().training.objective == 'classifier'


def test_sample_mode_with_cfg_on_a_trained_toy_network(tmp_path):
  """A class-conditional MLP trained with label dropout on the 8-mode ring (labels: the mode):
  `sample` with CFG puts the samples in the requested modes, with w = 0 and w = 2."""
  config = tiny_config(n_iters=2000, snapshot_freq=2000)
  config.model.ema_rate = 0.99  # 0.999 would still average in the untrained start
  presets.class_conditional(config, num_classes=8, label_dropout=0.1)
  config.eval.update(batch_size=400, num_samples=400)
  run_lib.train(config, str(tmp_path))
  ring = mixtures.ring2d()
  for w, spec in ((0., 'all'), (2., '3')):
    config.sampling.guidance_scale, config.sampling.labels = w, spec
    result = run_lib.sample(config, str(tmp_path))  # hands the guided task over
    assert result['nfe_per_sample'] == 50 and result['guidance'] == 'cfg'
    # What main.py prints of run_lib.sample's summary is there too.
    assert {'num_samples', 'ckpt', 'step', 'seconds', 'outputs'} <= set(result)
    assert os.path.exists(os.path.join(result['outputs'], 'sample.png'))
    with np.load(os.path.join(result['outputs'], 'samples.npz')) as f:
      x, labels = f['samples'], f['labels']
    np.testing.assert_array_equal(labels, cg.class_labels(spec, 400, 8))
    nearest = np.argmin(((x[:, None] - ring.means[None]) ** 2).sum(-1), axis=1)
    assert np.mean(nearest == labels) > 0.9, (w, np.mean(nearest == labels))


def test_digits_evaluators_write_metrics_and_grids(tmp_path):
  """evaluate() with enable_guidance and enable_inpainting on an untrained snapshot: the keys,
  the grids, and inpainting outputs equal to the test images where known (wiring only: tiny
  sizes, no quality expected)."""
  config = vp_ddpmpp_cfg.get_config()
  config.model.num_scales = 25  # 25 PC steps of inpainting
  config.sampling.n_steps = 2
  config.eval.update(begin_ckpt=1, end_ckpt=1, batch_size=20, num_samples=20, enable_loss=False,
                     enable_sampling=False, guidance_scales=(0., 2.),
                     inpaint_masks=('left_half', 'random_pixels:0.5'), inpaint_num_images=20)
  run = run_lib.setup(config, str(tmp_path))
  checkpointing.save(checkpointing.make_manager(os.path.join(tmp_path, 'checkpoints')), 1, run.state,
                     info={'step': 0})
  (result,) = run_lib.evaluate(config, str(tmp_path))
  for key in ('cfg_w0_fid', 'cfg_w0_acc', 'cfg_w2_fid', 'cfg_w2_acc', 'inpaint_left_half_mse',
              'inpaint_random_pixels_0.5_mse'):
    assert np.isfinite(result[key]), key
  assert 0. <= result['cfg_w2_acc'] <= 1.
  out = os.path.join(tmp_path, 'eval', 'ckpt_1')
  for name in ('class_grid_w0.png', 'class_grid_w2.png', 'guided_w2.npz', 'inpaint_left_half.png'):
    assert os.path.exists(os.path.join(out, name)), name
  with np.load(os.path.join(out, 'guided_w2.npz')) as f:
    np.testing.assert_array_equal(f['labels'], np.arange(20) % 10)
  saved = [json.loads(l) for l in open(os.path.join(tmp_path, 'eval', 'results.jsonl'))]
  assert saved[0]['cfg_w2_acc'] == result['cfg_w2_acc']
  # The completion function itself: known pixels come back as the test images.
  images, _ = controllable_run.test_images(config, 4)
  mask = cg.inpainting_mask('center', images.shape)
  fn = controllable_run.get_completion_fn(config, run.sde, run.model, run.scaler, run.inverse_scaler,
                                          run.eps, task='inpaint', guidance='none')
  x, nfe = fn(jax.random.PRNGKey(0), run.state.ema_params, images, mask, np.zeros(4, np.int32), 0.)
  assert int(nfe) == 25 * 2  # 25 PC steps: reverse diffusion + one Langevin step (the config's)
  known = np.broadcast_to(mask, images.shape) > 0
  np.testing.assert_allclose(np.asarray(x)[known], images[known], atol=1e-6)
  # The sample mode's inpainting task writes the three rows and the error.
  config.sampling.task, config.sampling.guidance, config.eval.num_samples = 'inpaint', 'none', 20
  summary = run_lib.sample(config, str(tmp_path))
  assert summary['task'] == 'inpaint' and np.isfinite(summary['mse'])
  with np.load(os.path.join(summary['outputs'], 'samples.npz')) as f:
    assert f['samples'].shape == f['truth'].shape == (20, 8, 8, 1)
