"""Match R-CNN's matching network: item embeddings and the pair similarity.

`MatchingHead` (the author's layer log): 7x7x256 pooled RoI features ->
three 3x3 conv 256 + ReLU -> one 1x1 conv 1024 + ReLU -> global average pool
-> fc -> embedding v [N, D]. Consumer ("user") and shop items go through the
same module, so the weights are shared.

`PairScorer` holds the similarity fc of the paper, fc((v1 - v2)^2): a weight
w [D] and a bias b, so

  logit(v1, v2) = sum_d w_d (v1_d - v2_d)^2 + b,   P(match) = sigmoid(logit).

It is symmetric in v1 and v2. Scoring every user item against every shop item
(training pairs within an image pair, or one query against a whole gallery at
retrieval time) expands the square into matrix products,

  sum_d w_d (a_d - b_d)^2 = (a^2) . w + (b^2) . w - 2 (a * w) . b,

so no [U, S, D] intermediate is formed (`expanded_square_logits`). Both sets
are first shifted by the same vector c (the mean of the two sets' means): the
logits do not depend on c, and the shift keeps the cancellation in the
expansion small when the embeddings share a large common component. The sums
run in float32 at HIGHEST matmul precision (no TF32 rounding on GPUs).
`pairwise_logits_reference` is the direct broadcasting formula, for tests.

Retrieval with trained weights, outside any Linen module:

  logits = pairwise_logits(variables["params"]["scorer"], v_query, v_gallery)
"""

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from df2_jax.models.layers import c2_msra_fill, c2_xavier_fill, f32_dot

Array = jnp.ndarray
Dtype = Any

_HIGHEST = jax.lax.Precision.HIGHEST


class MatchingHead(nn.Module):
  """Embedding v of every RoI for consumer-to-shop matching.

  Attributes:
    embed_dim: D, width of the embedding (256).
    conv_dim: width of the 3x3 convs (256).
    num_convs: number of 3x3 convs (3).
    proj_dim: width of the 1x1 conv before pooling (1024).
    dtype: compute dtype of the convs and fc (bfloat16 works); the embedding
      is returned in float32.
    param_dtype: parameter dtype.
  """
  embed_dim: int = 256
  conv_dim: int = 256
  num_convs: int = 3
  proj_dim: int = 1024
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Embeds RoIs.

    Args:
      x: [N, h, w, C] pooled RoI features (7x7x256 in Match R-CNN).

    Returns:
      [N, embed_dim] float32 embeddings v.
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype,
              kernel_init=c2_msra_fill, bias_init=nn.initializers.zeros)
    for i in range(self.num_convs):
      x = nn.Conv(self.conv_dim, (3, 3), padding=((1, 1), (1, 1)),
                  name=f"conv{i + 1}", **kw)(x)
      x = nn.relu(x)
    x = nn.Conv(self.proj_dim, (1, 1), name=f"conv{self.num_convs + 1}",
                **kw)(x)
    x = nn.relu(x)
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # global average pool
    x = nn.Dense(self.embed_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=c2_xavier_fill, bias_init=nn.initializers.zeros,
                 dot_general=f32_dot, name="fc")(x)
    return x.astype(jnp.float32)


def expanded_square_logits(w: Array, bias: Array, a: Array, b: Array,
                           center: Array | None = None) -> Array:
  """All-pairs logits sum_d w_d (a_d - b_d)^2 + bias by expanding the square.

  Args:
    w: [D] similarity weights.
    bias: [] similarity bias.
    a: [..., U, D] embeddings (e.g. user items, or queries).
    b: [..., S, D] embeddings (e.g. shop items, or the gallery); the leading
      dims broadcast against a's.
    center: [D] the shift subtracted from both sets; default the mean of the
      two sets' means. A fixed one makes the rounding of a gallery scored in
      chunks independent of how it is chunked.

  Returns:
    [..., U, S] float32 logits; entry (u, s) scores a[u] against b[s].
  """
  w = jnp.asarray(w, jnp.float32)
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  # A common shift cancels in a - b; it only reduces cancellation below.
  if center is None:
    c = 0.5 * (jnp.mean(a, axis=-2, keepdims=True) +
               jnp.mean(b, axis=-2, keepdims=True))
  else:
    c = jnp.asarray(center, jnp.float32)
  c = jax.lax.stop_gradient(c)
  a = a - c
  b = b - c
  sq_a = jnp.einsum("...ud,d->...u", a * a, w, precision=_HIGHEST)
  sq_b = jnp.einsum("...sd,d->...s", b * b, w, precision=_HIGHEST)
  cross = jnp.einsum("...ud,...sd->...us", a * w, b, precision=_HIGHEST)
  out = sq_a[..., :, None] + sq_b[..., None, :] - 2.0 * cross
  return out + jnp.asarray(bias, jnp.float32)


def pairwise_logits_reference(w: Array, bias: Array, a: Array,
                              b: Array) -> Array:
  """The direct formula fc((a - b)^2) with a [..., U, S, D] intermediate.

  Same arguments and result as `expanded_square_logits`; for tests.
  """
  a = jnp.asarray(a, jnp.float32)[..., :, None, :]
  b = jnp.asarray(b, jnp.float32)[..., None, :, :]
  d2 = jnp.square(a - b)
  return (jnp.sum(d2 * jnp.asarray(w, jnp.float32), axis=-1) +
          jnp.asarray(bias, jnp.float32))


def paired_logits(w: Array, bias: Array, a: Array, b: Array) -> Array:
  """Logits of aligned pairs (a[i] against b[i]), fc((a - b)^2).

  Args:
    w: [D] similarity weights.
    bias: [] similarity bias.
    a, b: [..., D] embeddings; the leading dims broadcast.

  Returns:
    [...] float32 logits.
  """
  d = jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32)
  return (jnp.sum(jnp.square(d) * jnp.asarray(w, jnp.float32), axis=-1) +
          jnp.asarray(bias, jnp.float32))


def pairwise_logits(params: Mapping[str, Array], v_user: Array,
                    v_shop: Array) -> Array:
  """All-pairs logits with a trained `PairScorer`'s parameters.

  Args:
    params: the scorer's parameter collection {"kernel": [D], "bias": []}
      (e.g. variables["params"]["scorer"]); {"params": {...}} also works.
    v_user: [..., U, D] embeddings (queries).
    v_shop: [..., S, D] embeddings (gallery).

  Returns:
    [..., U, S] float32 logits; sigmoid gives match probabilities.
  """
  if "params" in params:
    params = params["params"]
  return expanded_square_logits(params["kernel"], params["bias"], v_user,
                                v_shop)


SCORER_INITS = ("normal", "distance")  # PairScorer.weight_init


class PairScorer(nn.Module):
  """The similarity fc of the matching network, fc((v1 - v2)^2).

  Call it on sets to score all pairs, or use `paired` for aligned pairs; both
  use the same parameters "kernel" [embed_dim] and "bias" [].

  Attributes:
    embed_dim: D, the embedding width (MatchingHead.embed_dim).
    weight_init: "normal": weights drawn from N(0, 0.01^2), so the first logits are near 0 whatever
      the embeddings (an uninformed start); "distance": every weight -1/D, so the logit starts
      as minus the mean squared distance: close embeddings score higher from the first step,
      and the gradient reaching the embeddings is not scaled down by near-zero weights.
    param_dtype: parameter dtype; the logits are always computed in float32.
  """
  embed_dim: int = 256
  weight_init: str = "normal"
  param_dtype: Dtype = jnp.float32

  def setup(self):
    if self.weight_init == "normal":
      kernel_init = nn.initializers.normal(0.01)
    elif self.weight_init == "distance":
      kernel_init = nn.initializers.constant(-1.0 / self.embed_dim)
    else:
      raise ValueError(f"weight_init must be one of {SCORER_INITS}, got {self.weight_init!r}")
    self.kernel = self.param("kernel", kernel_init, (self.embed_dim,), self.param_dtype)
    self.bias = self.param("bias", nn.initializers.zeros, (), self.param_dtype)

  def _check(self, *xs: Array) -> None:
    for x in xs:
      if x.shape[-1] != self.embed_dim:
        raise ValueError(
            f"embedding width {x.shape[-1]} != embed_dim {self.embed_dim}")

  def __call__(self, v_user: Array, v_shop: Array) -> Array:
    """All-pairs logits.

    Args:
      v_user: [..., U, D] user (or query) embeddings.
      v_shop: [..., S, D] shop (or gallery) embeddings.

    Returns:
      [..., U, S] float32 logits.
    """
    self._check(v_user, v_shop)
    return expanded_square_logits(self.kernel, self.bias, v_user, v_shop)

  def paired(self, v1: Array, v2: Array) -> Array:
    """Logits of aligned pairs: [..., D] x [..., D] -> [...] float32."""
    self._check(v1, v2)
    return paired_logits(self.kernel, self.bias, v1, v2)


class PairMemory(nn.Module):
  """The pooled RoI features and labels of the last `steps` training steps' items.

  A ring buffer in the "memory" variable collection: each call returns what is stored (the
  items of the `steps` previous calls; empty places invalid) and, when "memory" is mutable (the
  train step), overwrites the oldest slot with this call's valid items, at most `items` of
  them (valid ones first, in their order; the rest are dropped), so padded instance slots cost
  nothing later. The pair loss embeds the stored features again with the current matching head,
  so the head trains on `steps` + 1 steps' worth of user-shop pairs per step while the backbone
  gets gradients from the current items only: a cross-batch memory as in Wang et al.,
  "Cross-Batch Memory for Embedding Learning" (CVPR 2020), but of features rather than stale
  embeddings, so that stored positives train the head too.

  Attributes:
    steps: S, how many calls' items are kept.
    items: K, items kept per call; 0: as many as a call passes.
  """
  steps: int
  items: int = 0

  @nn.compact
  def __call__(self, features: Array, pair_id: Array, style: Array, side: Array, group: Array,
               valid: Array) -> dict[str, Array]:
    """Reads, then writes, the memory.

    Args:
      features: [N, h, w, C] pooled features of N items; stored in their dtype.
      pair_id, style: [N] int labels; side: [N] int, 0 user item, 1 shop item; group: [N]
        int, the item's image pair; valid: [N] bool.

    Returns:
      {"features" [S, K, h, w, C], "pair_id", "style", "side", "group" [S, K] int32,
      "valid" [S, K] bool} as stored before this call.
    """
    new = {"features": jax.lax.stop_gradient(features), "pair_id": pair_id, "style": style,
           "side": side, "group": group, "valid": valid}
    k_items = self.items or features.shape[0]
    dtypes = {"features": features.dtype, "valid": jnp.bool_}
    slots = {k: self.variable("memory", k, jnp.zeros, (self.steps, k_items) + v.shape[1:],
                              dtypes.get(k, jnp.int32))
             for k, v in new.items()}
    cursor = self.variable("memory", "cursor", jnp.zeros, (), jnp.int32)
    stored = {k: v.value for k, v in slots.items()}
    if self.is_mutable_collection("memory") and not self.is_initializing():
      n = features.shape[0]
      if n < k_items:  # fewer items than places: pad with invalid ones
        new = {k: jnp.pad(v, [(0, k_items - n)] + [(0, 0)] * (v.ndim - 1))
               for k, v in new.items()}
      keep = jnp.argsort(~jnp.asarray(new["valid"], bool), stable=True)[:k_items]
      for name, slot in slots.items():
        slot.value = jax.lax.dynamic_update_index_in_dim(
            slot.value, new[name][keep].astype(slot.value.dtype), cursor.value, 0)
      cursor.value = (cursor.value + 1) % self.steps
    return stored
