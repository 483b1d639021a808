"""Entropic optimal transport between pixels and prompts, solved with ott-jax.

Every OTSeg Sinkhorn call is a batch of independent problems: for each (image, class) the M pixels
(uniform mass 1/M) are matched to the N prompts (uniform mass 1/N) under cost 1 - cosine.
"""

import jax
import jax.numpy as jnp
import ml_collections
from ott.geometry import geometry
from ott.problems.linear import linear_problem
from ott.solvers.linear import sinkhorn


def get_config() -> ml_collections.ConfigDict:
  """Solver settings; every field can be changed from a training config for ablations."""
  return ml_collections.ConfigDict(dict(
      epsilon=0.05,
      threshold=1e-6,
      min_iterations=0,
      max_iterations=100,
      inner_iterations=1,
      lse_mode=True,
      differentiation='unrolled',  # 'unrolled' (ott implicit_diff=None) | 'implicit'
      tau_a=1.0,
      tau_b=1.0,
  ))


def sinkhorn_plan(cost: jax.Array, config: ml_collections.ConfigDict) -> jax.Array:
  """Transport plans for a batch of problems with uniform marginals.

  Args:
    cost: (..., M, N) cost matrices.
    config: see `get_config`.

  Returns:
    (..., M, N) plans, each summing to 1, in the dtype of `cost`.
  """
  *batch, m, n = cost.shape
  dtype = jnp.promote_types(cost.dtype, jnp.float32)
  flat = cost.reshape(-1, m, n).astype(dtype)
  solver = sinkhorn.Sinkhorn(
      lse_mode=config.lse_mode,
      threshold=config.threshold,
      min_iterations=config.min_iterations,
      max_iterations=config.max_iterations,
      inner_iterations=config.inner_iterations,
      implicit_diff=None if config.differentiation == 'unrolled' else
      __import__('ott.solvers.linear.implicit_differentiation', fromlist=['x']).ImplicitDiff())

  def solve(c):
    geom = geometry.Geometry(cost_matrix=c, epsilon=config.epsilon)
    prob = linear_problem.LinearProblem(geom, tau_a=config.tau_a, tau_b=config.tau_b)
    # The plan must be materialised inside the vmapped function.
    return solver(prob).matrix

  return jax.vmap(solve)(flat).reshape(*batch, m, n).astype(cost.dtype)
