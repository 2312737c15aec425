"""A 2 x 2 toy sweep: MLP width x learning rate, for configs/toy/*.py (a few minutes on a CPU).

  python sweep.py --config configs/toy/vp_ring2d.py --sweep configs/sweeps/toy_2x2.py \
      --root runs/toy_2x2 --mode train
"""
from sweep import grid


def get_sweep():
  """The 4 points: model.nf in {32, 64} x optim.lr in {1e-3, 2e-3}."""
  return grid({'model.nf': [32, 64], 'optim.lr': [1e-3, 2e-3]})
