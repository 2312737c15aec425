"""Likelihood benchmark: probability-flow ODE log-likelihood of a batch of 16 under the closed-form
score of a D = 192 diagonal Gaussian, VPSDE(0.1, 20), rtol = atol = 1e-5, eps = 1e-5.

Prints NFE, score evaluations per NFE, compile and compiled wall time (median of 3) and the error
against the exact log-density of the model (nats/dim). Run: python benchmarks/likelihood.py"""
from common import count_score_calls, gaussian_problem, time_compiled

import jax
import jax.numpy as jnp
import numpy as np

import likelihood
import mixtures
import sde_lib


def main():
  g = gaussian_problem()
  sde = sde_lib.VPSDE(0.1, 20., 1000)
  score_fn = mixtures.score_fn(g, sde)
  x = g.sample(jax.random.PRNGKey(1), 16).reshape(16, 3, 8, 8)
  eps = 1e-5
  print(f'{"trace":12s} {"NFE":>5s} {"evals/NFE":>9s} {"compile s":>9s} {"run s":>8s} '
        f'{"mean err nats/dim":>17s} {"max err nats/dim":>16s}')
  for trace in ('rademacher', 'gaussian', 'exact'):
    run = jax.jit(lambda r, x: likelihood.log_likelihood(r, sde, score_fn, x, trace=trace, eps=eps))
    compile_s, run_s, (logp, z, nfe) = time_compiled(run, jax.random.PRNGKey(2), x)
    # The model's exact log-density: log p_eps(x), corrected for the prior standing in for p_T.
    t = lambda v: jnp.full((16,), v)
    exact = (mixtures.log_prob_fn(g, sde)(x, t(eps)) + sde.prior_logp(z)
             - mixtures.log_prob_fn(g, sde)(z, t(sde.T)))
    err = np.asarray(logp - exact) / 192
    counting, calls = count_score_calls(score_fn)
    likelihood.log_likelihood(jax.random.PRNGKey(2), sde, counting, x, trace=trace, eps=eps)[0].block_until_ready()
    jax.effects_barrier()
    print(f'{trace:12s} {int(nfe):5d} {len(calls) / int(nfe):9.2f} {compile_s:9.2f} {run_s:8.3f} '
          f'{np.abs(err.mean()):17.2e} {np.abs(err).max():16.2e}')


if __name__ == '__main__':
  main()
