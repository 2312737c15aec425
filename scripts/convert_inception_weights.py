"""Converts pytorch-fid's FID Inception weights (.pth) into this project's checksummed .npz, once.

    python scripts/convert_inception_weights.py pt_inception-2015-12-05-6726825d.pth fid.npz

Get the .pth on a machine with internet access from
https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
This script needs PyTorch (only to read the pickle; `pip install torch` on CPU is enough) and
checks the file's sha256 before converting. The .npz works anywhere, without PyTorch; point
`--config.eval.inception_weights` at it.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import inception  # noqa: E402  (the project root is added to the path above)


def read_state_dict(path: str) -> dict:
  """The .pth state dict as numpy arrays (needs torch)."""
  try:
    import torch
  except ImportError as e:
    raise SystemExit('Reading the .pth file needs PyTorch: pip install torch (the CPU build is '
                     'enough), or convert on any machine that has it; the .npz is portable.') from e
  state = torch.load(path, map_location='cpu', weights_only=True)
  return {k: v.detach().cpu().numpy() for k, v in state.items()}


def main(argv=None) -> None:
  """Command line: source .pth, output .npz."""
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('source', help=f'path to {inception.FID_WEIGHTS_FILE}')
  parser.add_argument('output', help='the .npz to write (config.eval.inception_weights)')
  args = parser.parse_args(argv)
  digest = inception.file_sha256(args.source)
  if digest != inception.FID_WEIGHTS_SHA256:
    raise SystemExit(f'{args.source} has sha256 {digest}, not that of {inception.FID_WEIGHTS_FILE} '
                     f'({inception.FID_WEIGHTS_SHA256}); download it again from '
                     f'{inception.FID_WEIGHTS_URL}.')
  variables = inception.variables_from_state_dict(read_state_dict(args.source))
  arrays = inception.save_variables(args.output, variables, digest)
  inception.load_fid_inception(args.output)  # read back: checksums and tree verified
  n = sum(v.size for v in inception.flatten(variables).values())
  print(f'Wrote {args.output}: {n:,} numbers, arrays sha256 {arrays}. Use it with '
        f'--config.eval.inception_weights={os.path.abspath(args.output)}')


if __name__ == '__main__':
  main()
