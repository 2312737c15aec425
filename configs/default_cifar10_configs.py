"""Default CIFAR-10 config: the base that every experiment config starts from (original layout)."""
import ml_collections
from ml_collections import config_dict


def get_default_configs() -> ml_collections.ConfigDict:
  """The original's CIFAR-10 defaults plus this project's extra knobs (marked 'new')."""
  config = ml_collections.ConfigDict()
  # training
  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 128
  training.n_iters = 1300001
  training.snapshot_freq = 50000
  training.log_freq = 50
  training.eval_freq = 100
  # store additional checkpoints for preemption in cloud computing environments
  training.snapshot_freq_for_preemption = 10000
  # produce samples at each snapshot.
  training.snapshot_sampling = True
  training.likelihood_weighting = False
  training.continuous = True
  training.n_jitted_steps = 5
  training.reduce_mean = False
  training.importance_sampling = False  # new: sample t from r(t) ~ lambda(t) / sigma_t^2
  training.max_to_keep = 3  # new: checkpoints kept by the checkpoint manager
  training.objective = 'score'  # new: 'score', or 'classifier' (noise-conditional classifier)
  training.label_dropout = 0.  # new: null-label rate of class-conditional training (CFG)

  # sampling
  config.sampling = sampling = ml_collections.ConfigDict()
  sampling.n_steps_each = 1
  sampling.noise_removal = True
  sampling.probability_flow = False
  sampling.snr = 0.16
  sampling.method = 'pc'
  sampling.predictor = 'euler_maruyama'
  sampling.corrector = 'none'
  sampling.rtol = 1e-5  # new: ODE sampler tolerances (the original hard-coded them)
  sampling.atol = 1e-5
  sampling.ode_solver = 'dopri5'  # new (ode.DEFAULT_SOLVER)
  # new: the fast solvers (method = 'ddim', 'heun', 'dpm_solver', 'dpmpp_2m', 'dpmpp_3m',
  # 'dpmpp_2m_sde' or 'unipc'): evaluation budget, time grid, and the stochastic solvers' eta
  # (None: the solver's default). noise_removal adds a final Tweedie denoising step there.
  sampling.n_steps = 20
  sampling.schedule = 'logsnr'
  sampling.eta = config_dict.placeholder(float)
  # new: controllable generation (controllable_generation.py; the sample mode and evaluators)
  sampling.task = 'sample'  # 'sample', 'inpaint' or 'colorize' (test-split images)
  sampling.mask = 'left_half'  # inpainting: the region to fill, see inpainting_mask
  sampling.guidance = 'none'  # 'none', 'classifier' or 'cfg' (classifier-free)
  sampling.guidance_scale = 1.  # classifier scale, or the CFG strength w (>= 0)
  sampling.labels = 'all'  # class ids ('3', '1,4,7') or 'all' (a class-balanced batch)
  sampling.classifier_config = ''  # classifier guidance: the classifier's config file
  sampling.classifier_workdir = ''  # ... and its training workdir (its latest snapshot)

  # evaluation
  config.eval = evaluate = ml_collections.ConfigDict()
  evaluate.begin_ckpt = 9
  evaluate.end_ckpt = 26
  evaluate.batch_size = 1024
  evaluate.enable_sampling = False
  evaluate.num_samples = 50000
  evaluate.enable_loss = True
  evaluate.enable_bpd = False
  evaluate.bpd_dataset = 'test'
  evaluate.bpd_num_repeats = 5  # new: dequantization passes over the split (the paper: 5)
  evaluate.rtol = 1e-5  # new: likelihood ODE tolerances
  evaluate.atol = 1e-5
  evaluate.inception_weights = ''  # new: local file with the FID Inception-v3 weights
  evaluate.feature_extractor = 'auto'  # new: 'inception', 'digits' or 'auto' (by data set)
  evaluate.ckpt_timeout_s = 0.  # new: how long to wait for a snapshot not yet written
  evaluate.ckpt = config_dict.placeholder(int)  # new: --mode sample's snapshot (None: newest)
  evaluate.stats_dir = ''  # new: where data statistics are cached ('' = <workdir>/stats)

  # data
  config.data = data = ml_collections.ConfigDict()
  data.dataset = 'CIFAR10'
  data.image_size = 32
  data.random_flip = True
  data.centered = False
  data.uniform_dequantization = False
  data.num_channels = 3
  # new: dataset='folder' reads the PNG / JPEG files under data.path (see datasets.py)
  data.path = ''
  data.center_crop = 0  # central crop size before resizing (0: the short side)
  data.class_folders = True  # the path's sub-folders are classes (labels)

  # model
  config.model = model = ml_collections.ConfigDict()
  model.sigma_min = 0.01
  model.sigma_max = 50.
  model.num_scales = 1000
  model.beta_min = 0.1
  model.beta_max = 20.
  model.dropout = 0.1
  model.embedding_type = 'fourier'
  model.dtype = 'float32'  # new: 'bfloat16' computes the network in bf16 (params stay f32)
  model.num_classes = 0  # new: > 0 makes NCSN++ / DDPM++ / DDPM class-conditional

  # optimization
  config.optim = optim = ml_collections.ConfigDict()
  optim.weight_decay = 0.
  optim.optimizer = 'Adam'
  optim.lr = 2e-4
  optim.beta1 = 0.9
  optim.eps = 1e-8
  optim.warmup = 5000
  optim.grad_clip = 1.

  config.seed = 42
  return config
