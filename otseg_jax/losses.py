"""OTSeg's training losses: sigmoid focal + dice per class map, as the authors' `SegLossPlus`.

Maps are channels-last: logits (B, H, W, K) over the K seen classes, labels (B, H, W) ints after
the visibility mapping (seen class i -> i, everything else, unseen classes included, -> 255).
All shapes are static: the authors loop over the classes present in each image; here every
(b, k) term is computed and the dice terms are masked by presence.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp


def segmentation_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    focal_weight: float = 100.0,
    dice_weight: float = 1.0,
    alpha: float = 0.25,
    gamma: float = 2.0,
    axis_name: str | None = None,
) -> dict[str, jax.Array]:
  """Weighted focal and dice losses of one logit map, normalised by the number of masks.

  With t[b, h, w, k] = (labels[b, h, w] == k), p = sigmoid(logits), P = H * W:
  - focal = sum_{b,k} mean_{h,w} alpha_t * BCE(logits, t) * (1 - p_t)^gamma / num_masks, over ALL
    K channels and ALL pixels. Quirk kept from the reference: ignored (255) pixels are not
    excluded; their target is 0 for every class, so they count as negatives.
  - dice = sum over present (b, k) of 1 - (2 sum_{h,w} p t + 1) / (sum p + sum t + 1), / num_masks.
    Class k is present in image b when some pixel of labels[b] equals k; 255 pixels enter the
    sums as negatives.
  - num_masks = max(1, number of present (b, k) pairs).
  The returned `loss_mask` is focal_weight * focal and `loss_dice` is dice_weight * dice.

  Devices: without `axis_name`, `logits` is the global batch. With `axis_name` (called inside
  pmap / shard_map / a named vmap, `logits` being this device's shard), the count of present pairs
  is `lax.psum`'d over that axis, and the returned losses are this device's share S_d / num_masks,
  where S_d sums this shard's terms and num_masks = max(1, global count). Summing the returned
  losses over devices therefore gives exactly the global-batch loss, and summing the per-device
  gradients gives its gradient: `lax.psum` them under pmap or `shard_map(check_vma=False)`; with
  shard_map's default vma checks, differentiating the psum'd loss w.r.t. replicated parameters
  already sums them (do not psum twice). Do not average over devices: the 1/num_devices is already
  in num_masks. The authors' DDP criterion divides S_d by max(1, count / world_size) and averages
  gradients over devices: the same gradient whenever the global count is at least the world size.

  Computed in float32 (float64 if `logits` is float64) whatever the model dtype; focal through
  log_sigmoid, so large logits give neither inf nor NaN in the loss or its gradient.

  Args:
    logits: (B, H, W, K) mask logits.
    labels: (B, H, W) int labels in [0, K) or 255 (any other value is also treated as ignore).
    focal_weight: weight of the focal term (the authors' mask_weight).
    dice_weight: weight of the dice term.
    alpha: focal balance for positives (negatives get 1 - alpha).
    gamma: focal exponent.
    axis_name: mapped device axis to sum num_masks over, or None.

  Returns:
    dict with `loss_mask` (), `loss_dice` () and `num_masks` () (the global, clamped count).
  """
  x = jnp.asarray(logits)
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  dtype = x.dtype
  k = x.shape[-1]
  # one_hot gives an all-zero row for 255 and any other out-of-range label.
  t = jax.nn.one_hot(labels, k, dtype=dtype)  # (B, H, W, K)

  # With z = x for positives and -x for negatives: BCE = -log sigmoid(z), 1 - p_t = sigmoid(-z).
  z = jnp.where(t > 0, x, -x)
  alpha_t = jnp.where(t > 0, alpha, 1.0 - alpha)
  focal = alpha_t * -jax.nn.log_sigmoid(z) * jnp.exp(gamma * jax.nn.log_sigmoid(-z))
  focal = jnp.sum(jnp.mean(focal, axis=(1, 2)))

  p = jax.nn.sigmoid(x)
  numerator = 2.0 * jnp.sum(p * t, axis=(1, 2))  # (B, K)
  denominator = jnp.sum(p, axis=(1, 2)) + jnp.sum(t, axis=(1, 2))
  present = jnp.any(t > 0, axis=(1, 2))  # (B, K)
  dice = jnp.sum(jnp.where(present, 1.0 - (numerator + 1.0) / (denominator + 1.0), 0.0))

  count = jnp.sum(present).astype(dtype)
  if axis_name is not None:
    count = jax.lax.psum(count, axis_name)
  num_masks = jnp.maximum(count, 1.0)
  return dict(loss_mask=focal_weight * focal / num_masks,
              loss_dice=dice_weight * dice / num_masks,
              num_masks=num_masks)


def otseg_loss(
    maps: Mapping[str, jax.Array], labels: jax.Array, **kwargs) -> dict[str, jax.Array]:
  """OTSeg's training terms: focal and dice on the decoder map and on the MPS score map.

  Args:
    maps: `decoder` (B, H, W, K) and, unless the MPS path is ablated, `score` (B, H, W, K)
      logits, the head's train maps.
    labels: (B, H, W) int, visibility-mapped, 255 = ignore.
    **kwargs: passed to `segmentation_loss` (weights, alpha, gamma, axis_name).

  Returns:
    dict with `decode.loss_mask`, `decode.loss_dice` and, with a score map, `score.loss_mask`,
    `score.loss_dice` (the reference's `loss/*` names), `total` (their sum) and `num_masks`; see
    `segmentation_loss` for what they mean under `axis_name`.
  """
  named = {'decode': maps['decoder']}
  if 'score' in maps:
    named['score'] = maps['score']
  return map_losses(named, labels, **kwargs)


def map_losses(maps: Mapping[str, jax.Array], labels: jax.Array,
               **kwargs) -> dict[str, jax.Array]:
  """Focal and dice on every map of `maps`: `{name}.loss_mask`, `{name}.loss_dice`, `total`,
  `num_masks`; for a method whose maps need no reference names."""
  losses = {}
  for prefix, logits in maps.items():
    terms = segmentation_loss(logits, labels, **kwargs)
    losses[f'{prefix}.loss_mask'] = terms['loss_mask']
    losses[f'{prefix}.loss_dice'] = terms['loss_dice']
  # Every map shares the labels, hence num_masks.
  losses['num_masks'] = terms['num_masks']
  losses['total'] = sum(v for name, v in losses.items() if '.loss_' in name)
  return losses


def mvpseg_loss(maps: Mapping[str, jax.Array], labels: jax.Array, *, ce_weight: float = 1.0,
                cls_weight: float = 1.0, oc_weight: float = 1.0,
                axis_name: str | None = None) -> dict[str, jax.Array]:
  """MVP-SEG's loss: l1 CE(m, y) + l2 multi-label BCE(g) + l3 OCLoss (`models.mvpseg`).

  - ce: cross entropy of the refined mask m = m_f * g renormalised over the K classes, i.e.
    log_softmax(fused + log sigmoid(gate)), averaged over the labelled pixels (255 ignored).
  - cls: binary cross entropy of the gate g[b, k] = sigmoid(gate[b, k]) against "class k is
    present in image b" (some pixel of labels[b] equals k), averaged over (b, k). The K channels
    are the training classes: in inductive training the seen ones only (unseen pixels arrive as
    255 and count for no class); in transductive training every class, unseen ones by their
    pseudo-labels.
  - oc: the orthogonality term, the same for every example, `maps['ocloss']` (B,).

  With `axis_name` (a mapped device axis) the counts are summed over it and each device returns
  its share, so that summing over devices gives the global-batch loss (as `segmentation_loss`).

  Args:
    maps: 'fused' (B, H, W, K) logits, 'gate' (B, K) logits, 'ocloss' (B,).
    labels: (B, H, W) int in [0, K) or 255.
    ce_weight, cls_weight, oc_weight: l1, l2, l3.
    axis_name: mapped device axis or None.

  Returns:
    dict with 'ce', 'cls', 'oc' (weighted), 'total', and 'num_masks' (the global count of
    present (b, k) pairs, at least 1).
  """
  fused = jnp.asarray(maps['fused'])
  dtype = jnp.promote_types(fused.dtype, jnp.float32)
  fused, gate = fused.astype(dtype), jnp.asarray(maps['gate']).astype(dtype)
  k = fused.shape[-1]
  psum = (lambda x: x) if axis_name is None else (lambda x: jax.lax.psum(x, axis_name))

  log_refined = jax.nn.log_softmax(fused + jax.nn.log_sigmoid(gate)[:, None, None, :], axis=-1)
  valid = (labels >= 0) & (labels < k)
  picked = jnp.take_along_axis(log_refined, jnp.where(valid, labels, 0)[..., None], axis=-1)
  pixels = jnp.maximum(psum(jnp.sum(valid).astype(dtype)), 1.0)
  ce = -jnp.sum(jnp.where(valid, picked[..., 0], 0.0)) / pixels

  present = jnp.any(jax.nn.one_hot(labels, k) > 0, axis=(1, 2))  # (B, K); 255 -> none
  bce = -jnp.where(present, jax.nn.log_sigmoid(gate), jax.nn.log_sigmoid(-gate))
  pairs = psum(jnp.asarray(gate.size, dtype))
  cls = jnp.sum(bce) / pairs

  ocloss = jnp.asarray(maps['ocloss']).astype(dtype)
  oc = jnp.sum(ocloss) / psum(jnp.asarray(ocloss.shape[0], dtype))

  terms = dict(ce=ce_weight * ce, cls=cls_weight * cls, oc=oc_weight * oc)
  terms['total'] = terms['ce'] + terms['cls'] + terms['oc']
  terms['num_masks'] = jnp.maximum(psum(jnp.sum(present).astype(dtype)), 1.0)
  return terms
