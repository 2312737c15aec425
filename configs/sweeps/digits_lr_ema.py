"""Learning rate x EMA rate on a digits config (6 points of about 6 minutes each on 2 CPU cores).

  python sweep.py --config configs/digits/vp_ddpmpp_continuous.py \
      --sweep configs/sweeps/digits_lr_ema.py --root runs/digits_lr_ema --mode train
"""
from sweep import grid


def get_sweep():
  """optim.lr in {5e-4, 1e-3, 2e-3} x model.ema_rate in {0.999, 0.9999}."""
  return grid({'optim.lr': [5e-4, 1e-3, 2e-3], 'model.ema_rate': [0.999, 0.9999]})
