"""Entropic optimal transport between pixels and prompts.

Every OTSeg Sinkhorn call is a batch of independent problems: for each (image, class) the M pixels
(uniform mass 1/M) are matched to the N prompts (uniform mass 1/N) under cost 1 - cosine, with
entropic regularisation epsilon. The plan P (M, N) minimises <C, P> - epsilon * H(P).

Two implementations, chosen by `config.implementation`:

- 'ott' (default): ott-jax's `Sinkhorn` on a cost-matrix `Geometry`, vmapped over the problems.
  Stops per problem when the marginal error ||P^T 1 - b||_1 < `threshold`.
- 'reference': an exact replica of the authors' `Sinkhorn_log_exp_sum`, for parity tests against
  their dumps and for ablations of their stopping rule. It adds 1e-8 inside the log marginals and
  stops ALL problems of the call together when mean|u - u_prev| over the whole batch <
  `reference_threshold` (see `sinkhorn_plan`).

Both are differentiated by unrolling the iterations by default, as the authors' autograd does.
`differentiation='truncated'` (ott only) solves without gradient and backpropagates through
`backprop_iterations` extra Sinkhorn iterations started from the converged potentials: the
backward pass costs those few iterations instead of every one that ran.

Ablations through ott (implementation='ott'): `solver='lr_sinkhorn'` is ott's low-rank Sinkhorn
(`LRSinkhorn`, plans of rank `lr_rank`), and `initializer` picks ott's Sinkhorn initializer for the
first potentials. The point-cloud initializers see the problem as `PointCloud(x / sqrt 2,
y / sqrt 2)` under the squared Euclidean cost, which for unit vectors is exactly 1 - cosine;
callers pass the points (`ot_layers.transport_map` does). Initializers only warm-start: the
solve is always on the given cost matrix, and the initial potentials carry no gradient.
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from ott.geometry import costs
from ott.geometry import geometry
from ott.geometry import pointcloud
from ott.initializers.linear import initializers
from ott.initializers.linear import initializers_lr
from ott.problems.linear import linear_problem
from ott.solvers.linear import implicit_differentiation
from ott.solvers.linear import sinkhorn
from ott.solvers.linear import sinkhorn_lr

DIFFERENTIATION = ('unrolled', 'implicit', 'truncated')
IMPLEMENTATIONS = ('ott', 'reference')
SOLVERS = ('sinkhorn', 'lr_sinkhorn')
# ott's Sinkhorn initializers offered; 'gaussian' and 'subsample' need the point clouds. ott's
# 'sorting' initializer needs square costs (M pixels == N prompts), never the case here.
INITIALIZERS = ('default', 'gaussian', 'subsample')
POINT_INITIALIZERS = ('gaussian', 'subsample')
# ott's LRSinkhorn initializers; 'k-means' needs the point clouds. ott's 'generalized-k-means'
# asserts a square cost matrix (M == N), never the case here.
LR_INITIALIZERS = ('random', 'rank2', 'k-means')
SQUARE_ONLY = ('sorting', 'generalized-k-means')


def get_config() -> ml_collections.ConfigDict:
  """Solver settings; every field can be changed from a training config for ablations.

  Default `threshold` = 1e-6 on ott's marginal error ||P^T 1 - b||_1. Measured with this module
  on `sinkhorn_cases.npz` (eps 0.05, 8 problems of M=64 x N=6; max abs difference relative to the
  reference's max; float32, float64 gives the same figures but on the 1e-7 row):

  | threshold | iterations | T vs converged | T vs as-is single / batched | VJP conv. / as-is b. |
  |---|---|---|---|---|
  | 1e-4 | 17-25 | 2.5e-4 | 2.4e-4 / 2.3e-4 | 4.9e-3 / 4.9e-3 |
  | 1e-5 | 23-32 | 2.9e-5 | 5.0e-5 / 1.9e-4 | 6.1e-4 / 6.1e-4 |
  | 1e-6 | 28-39 | 3.5e-6 | 4.9e-5 / 1.9e-4 | 5.4e-5 / 2.2e-4 |
  | 1e-7 | 34-46 in f64; f32 never gets there: 100 | 1.4e-6 | 4.9e-5 / 1.9e-4 | 1.0e-6 / 2.2e-4 |
  | as-is itself | 21-29 | 4.9e-5 single, 1.8e-4 batched | - | 1.4e-4 single, 2.2e-4 batched |

  From 1e-6 on, the distance to the authors' as-is plans equals the as-is plans' own distance to
  the converged plan: tightening further only costs iterations (and 1e-7 is below float32's error
  floor). 1e-5 is as converged as the as-is plans themselves (their marginal L1 error is 0.9-1.4e-5)
  but errs in another direction, so it adds its own gap to theirs (VJP 6.1e-4 vs 2.2e-4).
  On the model's MPS-path costs (otseg_small / otseg_holdout, float32) threshold 1e-6 gives score
  maps within 9.5e-5 / 3.2e-4 of the as-is dumps (as-is vs converged: 9.6e-5) and score VJPs within
  4.3e-4 / 2.8e-4 of the exact replica; it needs 23-41 / 24-52 iterations where the as-is rule
  stopped at 28 / 30. At M=1024..4096 in float32 the error still gets below 1e-6.

  `reference_threshold` (1e-6) and `max_iterations` (100) are the authors' values; with
  `implementation = 'reference'` and nothing else changed, the solver is their function.
  """
  return ml_collections.ConfigDict(dict(
      implementation='ott',  # 'ott' | 'reference' (the authors' loop, for parity and ablations)
      epsilon=0.05,
      threshold=1e-6,  # ott only: stop when ||P^T 1 - b||_norm_error < threshold
      norm_error=1,  # ott only
      reference_threshold=1e-6,  # reference only: stop when batch-mean |u - u_prev| < this
      # min == max gives a fixed number of iterations (no stopping test); with 'ott' and
      # 'unrolled' it runs as ott's while loop, not its scan (ott 0.6 scan-VJP bug, see
      # `_fixed_iterations_guard`).
      min_iterations=0,
      max_iterations=100,
      inner_iterations=1,  # ott only: iterations between two error evaluations
      lse_mode=True,
      # 'unrolled' (implicit_diff=None, as the authors) | 'implicit' | 'truncated' (below)
      differentiation='unrolled',
      backprop_iterations=10,  # 'truncated': iterations differentiated, from the solved potentials
      tau_a=1.0,  # ott only: < 1 relaxes the pixel marginal (unbalanced OT)
      tau_b=1.0,  # ott only: < 1 relaxes the prompt marginal
      # Ablations, ott only (module docstring). 'sinkhorn' | 'lr_sinkhorn' (ott's LRSinkhorn).
      solver='sinkhorn',
      # Sinkhorn: ott's initializer of the potentials, 'default' (zeros) | 'gaussian' |
      # 'subsample' (Sinkhorn on subsample_n_x pixels x subsample_n_y prompts, sampled with
      # replacement, interpolated to all pixels).
      initializer='default',
      subsample_n_x=64,  # ours
      subsample_n_y=None,  # ours: None = N, all prompts (sampled with replacement)
      # lr_sinkhorn: plan rank (<= min(M, N)), ott's mirror-descent step gamma and its rescaling,
      # the entropy on top of the low-rank problem (None = `epsilon`, ours: only the rank
      # constraint differs from the default), its initializer, its stopping threshold on the
      # change of the objective (ott's default), iterations between two tests (ott's default).
      # min_iterations / max_iterations are shared with the Sinkhorn solver.
      lr_rank=2,  # ours
      lr_gamma=10.0,
      lr_gamma_rescale=False,  # True (ott's default) cannot be differentiated (check_config)
      lr_epsilon=None,  # ours
      lr_initializer='random',  # 'random' | 'rank2' | 'k-means'
      lr_threshold=1e-3,
      lr_inner_iterations=10,
  ))


def needs_points(config: ml_collections.ConfigDict) -> bool:
  """Whether the solver needs the point clouds (`points` of `sinkhorn_plan_with_info`)."""
  if config.solver == 'lr_sinkhorn':
    return config.lr_initializer == 'k-means'
  return config.initializer in POINT_INITIALIZERS


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError on settings the solvers would misread or silently ignore."""
  if config.implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f'ot: implementation={config.implementation!r}, expected one of {IMPLEMENTATIONS}.')
  if config.differentiation not in DIFFERENTIATION:
    raise ValueError(
        f'ot: differentiation={config.differentiation!r}, expected one of {DIFFERENTIATION}.')
  if not config.epsilon > 0:
    raise ValueError(f'ot: epsilon must be > 0, got {config.epsilon}.')
  if not config.threshold >= 0 or not config.reference_threshold >= 0:
    raise ValueError(f'ot: thresholds must be >= 0, got threshold={config.threshold}, '
                     f'reference_threshold={config.reference_threshold}.')
  if config.norm_error < 1:
    raise ValueError(f'ot: norm_error must be >= 1, got {config.norm_error}.')
  if config.max_iterations < 1 or config.min_iterations < 0:
    raise ValueError(f'ot: need max_iterations >= 1 and min_iterations >= 0, got '
                     f'{config.min_iterations}, {config.max_iterations}.')
  if config.min_iterations > config.max_iterations:
    raise ValueError(f'ot: min_iterations={config.min_iterations} > '
                     f'max_iterations={config.max_iterations}.')
  if config.differentiation == 'truncated' and config.backprop_iterations < 1:
    raise ValueError(f'ot: backprop_iterations must be >= 1 with differentiation=\'truncated\', '
                     f'got {config.backprop_iterations}.')
  if config.inner_iterations < 1:
    raise ValueError(f'ot: inner_iterations must be >= 1, got {config.inner_iterations}.')
  if (config.implementation == 'ott' and config.min_iterations == config.max_iterations
      and config.max_iterations % config.inner_iterations):
    # ott's scan runs max // inner blocks, its while loop (see _fixed_iterations_guard) rounds up.
    raise ValueError(f'ot: a fixed number of iterations (min_iterations == max_iterations = '
                     f'{config.max_iterations}) must be a multiple of inner_iterations='
                     f'{config.inner_iterations}.')
  for name in ('tau_a', 'tau_b'):
    if not 0 < config[name] <= 1:
      raise ValueError(f'ot: {name} must be in (0, 1], got {config[name]}.')
  if config.solver not in SOLVERS:
    raise ValueError(f'ot: solver={config.solver!r}, expected one of {SOLVERS}.')
  if config.initializer == 'sorting':
    raise ValueError("ot: initializer='sorting' (ott's SortingInitializer) needs square cost "
                     'matrices, M pixels == N prompts, which OTSeg never has; use one of '
                     f'{INITIALIZERS}.')
  if config.initializer not in INITIALIZERS:
    raise ValueError(f'ot: initializer={config.initializer!r}, expected one of {INITIALIZERS}.')
  if config.initializer == 'subsample' and not (
      config.subsample_n_x >= 1 and (config.subsample_n_y is None or config.subsample_n_y >= 1)):
    raise ValueError(f'ot: subsample_n_x / subsample_n_y must be >= 1, got '
                     f'{config.subsample_n_x}, {config.subsample_n_y}.')
  if config.implementation == 'reference' and (
      config.solver != 'sinkhorn' or config.initializer != 'default'):
    raise ValueError("ot: implementation='reference' is the authors' loop: solver='sinkhorn' "
                     "and initializer='default' only (the ablations are ott's: "
                     "implementation='ott').")
  if config.solver == 'lr_sinkhorn':
    if config.initializer != 'default':
      raise ValueError("ot: solver='lr_sinkhorn' is initialised by lr_initializer; initializer "
                       f"(the Sinkhorn solver's) must stay 'default', got {config.initializer!r}.")
    if config.lr_initializer in SQUARE_ONLY:
      raise ValueError(f"ot: lr_initializer={config.lr_initializer!r} (ott's) needs square cost "
                       'matrices, M pixels == N prompts, which OTSeg never has; use one of '
                       f'{LR_INITIALIZERS}.')
    if config.lr_initializer not in LR_INITIALIZERS:
      raise ValueError(f'ot: lr_initializer={config.lr_initializer!r}, expected one of '
                       f'{LR_INITIALIZERS}.')
    if config.differentiation != 'unrolled':
      raise ValueError("ot: solver='lr_sinkhorn' only supports differentiation='unrolled' "
                       '(ott 0.6 implements no implicit differentiation for it).')
    if config.min_iterations == config.max_iterations:
      # ott's LRSinkhorn runs the same fixed-point loop: its scan VJP (min == max) is wrong.
      raise ValueError("ot: solver='lr_sinkhorn' with min_iterations == max_iterations would use "
                       "ott 0.6's fixed-iteration scan, whose gradients are wrong; set "
                       'min_iterations < max_iterations.')
    if config.lr_gamma_rescale:
      # Measured: jax.grad raises CustomVJPException (differentiation w.r.t. a closed-over value):
      # the rescaled step depends on the cost and Dykstra's custom-VJP loop closes over it.
      raise ValueError("ot: solver='lr_sinkhorn' with lr_gamma_rescale=True cannot be "
                       "differentiated in ott 0.6 (the cost-dependent step is closed over by its "
                       'Dykstra loop); use lr_gamma_rescale=False.')
    if config.lr_rank < 1:
      raise ValueError(f'ot: lr_rank must be >= 1, got {config.lr_rank}.')
    if config.lr_epsilon is not None and config.lr_epsilon < 0:
      raise ValueError(f'ot: lr_epsilon must be >= 0 or None, got {config.lr_epsilon}.')
    if config.lr_inner_iterations < 1 or config.max_iterations % config.lr_inner_iterations:
      raise ValueError(f'ot: lr_inner_iterations={config.lr_inner_iterations} must be >= 1 and '
                       f'divide max_iterations={config.max_iterations}.')
  if config.implementation == 'reference':
    # The replica is the authors' balanced log-domain loop, unrolled; anything else would be a
    # different algorithm under the replica's name.
    if config.differentiation != 'unrolled':
      raise ValueError("ot: implementation='reference' only supports differentiation='unrolled'.")
    if config.tau_a != 1 or config.tau_b != 1:
      raise ValueError("ot: implementation='reference' is balanced; tau_a and tau_b must be 1.")
    if not config.lse_mode:
      raise ValueError("ot: implementation='reference' is log-domain; lse_mode must be True.")


def sinkhorn_plan(cost: jax.Array, config: ml_collections.ConfigDict,
                  points: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
  """Transport plans for a batch of problems with uniform marginals.

  See `sinkhorn_plan_with_info`; this returns only the plans.

  Args:
    cost: (..., M, N) cost matrices.
    config: see `get_config`.

  Returns:
    (..., M, N) plans in the dtype of `cost`.
  """
  return sinkhorn_plan_with_info(cost, config, points)[0]


def sinkhorn_plan_with_info(
    cost: jax.Array, config: ml_collections.ConfigDict,
    points: tuple[jax.Array, jax.Array] | None = None) -> tuple[jax.Array, dict[str, Any]]:
  """Transport plans for a batch of problems with uniform marginals, and solver diagnostics.

  The solve always runs in float32, or float64 when `cost` is float64, whatever the model dtype:
  a bf16 cost is solved in float32 and the plan cast back to bf16 (exp((f + g - C) / eps) with
  eps = 0.05 amplifies bf16 rounding of C by 20x).

  'ott': each (M, N) problem is an ott `LinearProblem` on `Geometry(cost_matrix=C, epsilon)`
  (absolute epsilon) with uniform a = 1/M, b = 1/N, solved by `jax.vmap` over the flattened
  leading axes. Notes measured with ott-jax 0.6.0:
  - The plan is materialised inside the vmapped function; ott's output object is not returned
    across the vmap.
  - A vmapped while loop runs until the slowest problem of the batch has converged (the others
    keep iterating, frozen by select), so the cost of a call is that of its hardest problem.
  - ott updates g (prompts) then f (pixels), so the row sums of the plan are exact and the column
    sums carry the error; the authors' loop is the other way round. Differences are at the
    threshold level.
  - differentiation='implicit' (ott `ImplicitDiff`) of a balanced problem in float32 fails with a
    lineax NaN error from the singular linear system; it works in float64 or with tau_a/tau_b < 1.
    It is only meaningful for well-converged plans; 'unrolled' is what the authors do.
  - With tau_a or tau_b < 1 (unbalanced) the plan's mass is no longer 1.

  'reference': the authors' `Sinkhorn_log_exp_sum`, in JAX. Potentials u (..., M), v (..., N) start
  at 0; each iteration does
    u <- eps * (log(1/M + 1e-8) - LSE_n((-C + u + v) / eps)) + u,
    v <- eps * (log(1/N + 1e-8) - LSE_m((-C + u + v) / eps)) + v,
  then err = mean |u - u_prev| over ALL problems of the call (all leading axes of `cost`, i.e. the
  B*K problems of a model call; under an outer `jax.vmap` each mapped slice is its own call).
  It stops once err < `reference_threshold` (and at least `min_iterations` ran), at most
  `max_iterations`; P = exp((-C + u + v) / eps). The +1e-8 terms set an error floor of
  eps * ln((1 + M e-8) / (1 + N e-8)). It is a fixed-length `lax.scan` over `max_iterations` whose
  body is a `lax.cond` that leaves the state unchanged once converged: reverse-mode differentiation
  unrolls exactly the iterations that ran, and since the stop is one scalar per call, the frozen
  steps cost nothing outside an outer vmap.

  Args:
    cost: (..., M, N) cost matrices (e.g. 1 - cosine).
    config: see `get_config`; checked by `check_config`.
    points: (x (..., M, C), y (..., N, C)), the unit vectors whose 1 - cosine is `cost`; needed
      only when `needs_points(config)` (point-cloud initializers), ignored otherwise. Their
      leading axes broadcast against cost's (size 1 or equal; e.g. pixels (B, 1, M, C) against
      prompts (B, K, N, C)); broadcast axes are not materialised (nested vmaps).

  Returns:
    plan: (..., M, N) in the dtype of `cost`.
    info: 'ott': `iterations` (...,) int, `error` (...,) last marginal error, `converged` (...,)
      bool. 'reference': `iterations` () int, the authors' iteration count, `error` () the stopping
      error and `prev_error` () the error one iteration earlier (inf if the first one stopped).
  """
  check_config(config)
  cost = jnp.asarray(cost)
  *batch, m, n = cost.shape
  flat = cost.reshape(-1, m, n).astype(jnp.promote_types(cost.dtype, jnp.float32))
  if config.implementation == 'reference':
    plan, info = _reference_sinkhorn(flat, config)
  elif not needs_points(config):
    plan, info = jax.vmap(_ott_solve_fn(config))(flat)
    info = jax.tree.map(lambda x: x.reshape(batch), info)
  else:
    if points is None:
      raise ValueError(f'ot: initializer={config.initializer!r} / lr_initializer='
                       f'{config.lr_initializer!r} needs the point clouds: pass points=(x, y).')
    x, y = (jnp.asarray(p, flat.dtype) for p in points)
    if x.shape[-2] != m or y.shape[-2] != n or x.shape[-1] != y.shape[-1]:
      raise ValueError(f'ot: points {x.shape}, {y.shape} do not match cost {cost.shape}.')
    if config.solver == 'sinkhorn' and config.initializer == 'gaussian' and min(m, n) <= x.shape[-1]:
      # Measured: with N <= C the prompts' covariance is singular and ott's Gaussian potential
      # is NaN (every plan and gradient NaN); OTSeg has N = 8 prompts in C = 512 dimensions.
      raise ValueError(f"ot: initializer='gaussian' fits a Gaussian to each point cloud and needs "
                       f'more points than dimensions: M={m}, N={n}, C={x.shape[-1]}.')
    lead = len(batch)
    x = x.reshape((1,) * (lead + 2 - x.ndim) + x.shape)
    y = y.reshape((1,) * (lead + 2 - y.ndim) + y.shape)
    plan, info = _nested_vmap(_ott_solve_fn(config), lead)(flat.reshape(cost.shape), x, y)
  return plan.reshape(*batch, m, n).astype(cost.dtype), info


def _nested_vmap(fn, lead: int):
  """`fn` mapped over `lead` leading axes of its first argument (the cost); the other arguments
  are mapped where their axis has the cost's size and shared where it has size 1."""
  if lead == 0:
    return fn

  def mapped(*args):
    axes = [0] + [0 if a.shape[0] != 1 or args[0].shape[0] == 1 else None for a in args[1:]]
    args = [a if ax == 0 else a[0] for a, ax in zip(args, axes)]
    return jax.vmap(_nested_vmap(fn, lead - 1), in_axes=axes)(*args)

  return mapped


def _fixed_iterations_guard(config: ml_collections.ConfigDict) -> tuple[int, float, int]:
  """(min_iterations, threshold, inner_iterations) to hand ott's Sinkhorn.

  ott-jax 0.6 bug: with min_iterations == max_iterations its unrolled loop is a `lax.scan`, and the
  custom VJP of that scan (`fixpoint_iter_bwd`, force_scan) starts its backward pass at iteration 0
  and walks the stored states in the wrong order, so the gradients are wrong while the plans are
  right (tests/test_ot.py::test_fixed_iterations_gradient_guard). A fixed number of iterations is
  therefore run as ott's while loop, whose backward is correct, with threshold 0: the marginal
  error is a norm, never < 0, so the loop stops only at max_iterations (or on a non-finite error,
  as ott always does). The loop tests every inner_iterations = r iterations; the test at counter c
  reads the error of iteration c - 1, and ott stores inf (read as divergence) for iterations below
  min_iterations, so min_iterations is set to one below the last test before max_iterations.
  That needs r >= 2 (with r = 1 the test at c = min_iterations would read an inf): r = 1 becomes
  the smallest divisor >= 2 of max_iterations, which changes nothing but where errors are
  computed (two evaluations per call instead of every one). Only the unrolled backward uses the
  loop's VJP; 'implicit' and 'truncated' keep ott's scan.
  """
  k, r = config.max_iterations, config.inner_iterations
  if not (config.min_iterations == k and config.differentiation == 'unrolled'):
    return config.min_iterations, config.threshold, r
  if r == 1:
    r = next(d for d in range(2, k + 1) if k % d == 0) if k > 1 else 1
  last_test = (k - 1) // r * r
  return max(last_test - 1, 0), 0.0, r


def _point_problem(x, y, config):
  """The point-cloud view of a problem, for the initializers: ||x/sqrt2 - y/sqrt2||^2 = 1 - x.y
  for unit vectors. x (M, C), y (N, C)."""
  scale = jnp.sqrt(jnp.asarray(2.0, x.dtype))
  geom = pointcloud.PointCloud(x / scale, y / scale, cost_fn=costs.SqEuclidean(),
                               epsilon=config.epsilon)
  return linear_problem.LinearProblem(geom, tau_a=config.tau_a, tau_b=config.tau_b)


def _initial_potentials(config, prob_points):
  """ott's Sinkhorn initializer on the point-cloud problem; None for 'default' (zeros)."""
  if config.initializer == 'default':
    return None
  if config.initializer == 'gaussian':
    init = initializers.GaussianInitializer()
  else:
    n = prob_points.geom.y.shape[0]
    init = initializers.SubsampleInitializer(
        # The subsampled geometry keeps this problem's epsilon and cost.
        config.subsample_n_x, n if config.subsample_n_y is None else config.subsample_n_y)
  # A fixed key: the same subsample for every problem and step (ours; deterministic).
  return jax.lax.stop_gradient(
      init(prob_points, lse_mode=config.lse_mode, rng=jax.random.PRNGKey(0)))


def _lr_solve(c, config, points):
  """ott's LRSinkhorn on one (M, N) cost; plan (M, N) and info."""
  m, n = c.shape
  if config.lr_rank > min(m, n):
    raise ValueError(f'ot: lr_rank={config.lr_rank} > min(M, N) = min({m}, {n}).')
  prob = linear_problem.LinearProblem(
      geometry.Geometry(cost_matrix=c, epsilon=config.epsilon), tau_a=config.tau_a,
      tau_b=config.tau_b)
  rank = config.lr_rank
  if config.lr_initializer == 'random':
    init = initializers_lr.RandomInitializer(rank)
  elif config.lr_initializer == 'rank2':
    init = initializers_lr.Rank2Initializer(rank)
  else:
    init = initializers_lr.KMeansInitializer(rank)
  init_prob = prob if points is None else _point_problem(*points, config)
  factors = jax.lax.stop_gradient(init(init_prob, rng=jax.random.PRNGKey(0)))
  solver = sinkhorn_lr.LRSinkhorn(
      rank=rank, gamma=config.lr_gamma, gamma_rescale=config.lr_gamma_rescale,
      epsilon=config.epsilon if config.lr_epsilon is None else config.lr_epsilon,
      lse_mode=config.lse_mode, inner_iterations=config.lr_inner_iterations,
      threshold=config.lr_threshold, min_iterations=config.min_iterations,
      max_iterations=config.max_iterations)
  out = solver(prob, init=factors)
  last = jnp.maximum(jnp.sum(out.errors != -1) - 1, 0)
  return out.matrix, dict(iterations=out.n_iters, error=out.errors[last], converged=out.converged)


def _ott_solve_fn(config: ml_collections.ConfigDict):
  """The per-problem ott solve: (cost (M, N)[, x (M, C), y (N, C)]) -> (plan (M, N), info)."""
  if config.solver == 'lr_sinkhorn':
    return lambda c, *points: _lr_solve(c, config, points or None)

  min_iterations, threshold, inner_iterations = _fixed_iterations_guard(config)
  solver = sinkhorn.Sinkhorn(
      lse_mode=config.lse_mode,
      threshold=threshold,
      norm_error=config.norm_error,
      min_iterations=min_iterations,
      max_iterations=config.max_iterations,
      inner_iterations=inner_iterations,
      implicit_diff=(implicit_differentiation.ImplicitDiff()
                     if config.differentiation == 'implicit' else None))

  truncated = config.differentiation == 'truncated'

  def solve(c, *points):
    problem = lambda cost: linear_problem.LinearProblem(
        geometry.Geometry(cost_matrix=cost, epsilon=config.epsilon), tau_a=config.tau_a,
        tau_b=config.tau_b)
    prob = problem(c)
    init = _initial_potentials(config, _point_problem(*points, config)) if points else None
    out = solver(problem(jax.lax.stop_gradient(c)) if truncated else prob, init=init)
    # Errors are recorded every inner_iterations; -1 marks the slots never reached.
    last = jnp.maximum(jnp.sum(out.errors != -1) - 1, 0)
    # `converged` against the configured threshold (the guard above may hand ott threshold 0).
    error = out.errors[last]
    info = dict(iterations=out.n_iters, error=error,
                converged=jnp.logical_and(~jnp.any(jnp.isnan(out.errors)),
                                          error < config.threshold))
    if not truncated:
      return out.matrix, info
    # The same g-then-f LSE updates as ott's solver, on the differentiable cost, from the
    # converged potentials: at a fixed point they change nothing in the forward pass.
    f, g = jax.lax.stop_gradient((out.f, out.g))
    geom = prob.geom
    for _ in range(config.backprop_iterations):
      g = config.tau_b * geom.update_potential(f, g, jnp.log(prob.b), 0, axis=0)
      f = config.tau_a * geom.update_potential(f, g, jnp.log(prob.a), 0, axis=1)
    return geom.transport_from_potentials(f, g), info

  return solve


def _reference_sinkhorn(cost: jax.Array, config: ml_collections.ConfigDict):
  """The authors' loop on (P, M, N) costs: plans (P, M, N) and the call's scalar info."""
  eps = config.epsilon
  p, m, n = cost.shape
  log_mu = jnp.log(jnp.full((m,), 1.0 / m, cost.dtype) + 1e-8)
  log_nu = jnp.log(jnp.full((n,), 1.0 / n, cost.dtype) + 1e-8)

  def log_kernel(u, v):
    # Same association as the authors' (-C + u) + v, then / eps.
    return (-cost + u[:, :, None] + v[:, None, :]) / eps

  def iterate(state):
    u, v, iters, err, _, _ = state
    u_new = eps * (log_mu - jax.nn.logsumexp(log_kernel(u, v), axis=2)) + u
    v_new = eps * (log_nu - jax.nn.logsumexp(log_kernel(u_new, v), axis=1)) + v
    new_err = jnp.mean(jnp.abs(u_new - u))
    iters = iters + 1
    done = jnp.logical_and(new_err < config.reference_threshold, iters >= config.min_iterations)
    return u_new, v_new, iters, new_err, err, done

  def step(state, _):
    done = state[-1]
    return jax.lax.cond(done, lambda s: s, iterate, state), None

  inf = jnp.array(jnp.inf, cost.dtype)
  state = (jnp.zeros((p, m), cost.dtype), jnp.zeros((p, n), cost.dtype),
           jnp.array(0, jnp.int32), inf, inf, jnp.array(False))
  (u, v, iters, err, prev_err, _), _ = jax.lax.scan(step, state, length=config.max_iterations)
  plan = jnp.exp(log_kernel(u, v))
  return plan, dict(iterations=iters, error=err, prev_error=prev_err)
