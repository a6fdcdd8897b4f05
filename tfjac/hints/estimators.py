"""Estimators of the Jacobian terms without double backprop: directional derivatives J u along
random probes u, by forward mode (`jvp`) or central finite differences (`fd`).

`backprop` (the default) takes the selected rows of the input Jacobian, [B, K, D], by reverse
mode; the student's inside the weight tape, so its term reaches the weights by double backprop.
The estimators take, for P probes u_p drawn in input space with E[u u^T] = I (Rademacher or
Gaussian), the *sketch* [B, K, P] of the same K selected rows: S[b, k, p] = (J_k u_p) / sqrt(P),
  jvp: J u by one forward-mode pass (tf.autodiff.ForwardAccumulator), exact up to rounding;
  fd:  (f(x + eps u) - f(x - eps u)) / (2 eps), forward passes only, bias O(eps^2) where f is
       smooth (a ReLU network is piecewise linear: exact inside one linear region).
Since E_u[(a.u)(b.u)] = a.b, every bilinear form of the sketches is an unbiased estimate of the
same form of the rows: sum_{k,p} (S_T - S_S)^2 estimates sum_k ||J_T,k - J_S,k||^2 (the raw `jac`
term; with jac_target=all, ||J_T - J_S||_F^2 over every output), and jac_ce's and jacnorm's
products likewise. The hint losses take sketches where they take Jacobians, unchanged.

The normalised form (`jac`, jac_normalize) cannot be estimated without bias: a norm is not a
bilinear form. Under an estimator it is || S_T/||S_T|| - S_S/||S_S|| ||^2 with each example's
whole sketch (its K rows and P probes) normalised by its Frobenius norm (`whole_sketch`). As P
grows it tends to || J_T/||J_T||_F - J_S/||J_S||_F ||_F^2 over the K selected rows (the
normalised Jacobian of those rows *as one matrix*; backprop normalises each row apart, the same
thing when K = 1); for finite P it is biased (tests/test_estimators.py measures the bias), and
with K = P = 1 it is the sign agreement of two scalars, 0 or 4, with no gradient: refused.

BatchNorm: the probes' passes are per example. In training (`batch_stats` policy) the student's
perturbed / forward-mode pass normalises with the clean pass's batch statistics
(models/layers.py, reusing_batch_statistics), constants for the direction (no tangent flows
through them, no cross-example term) and still functions of the weights for the weight tape,
as holding_batch_statistics does for backprop; the moving statistics are updated once, by the
clean pass. Under the `inference` policy the probes' pass runs in inference mode.
"""
import math
from typing import Callable, Dict, Optional, Tuple

import tensorflow as tf

from tfjac.hints import jacobians

ESTIMATORS = ("backprop", "jvp", "fd")
PROBES = ("rademacher", "gaussian")


def probe_directions(x, *, probes: int, kind: str, seed) -> tf.Tensor:
  """[P, B, ...] probes shaped like x, E[u u^T] = I per example: Rademacher (+-1) or standard
  Gaussian entries, drawn from the stateless `seed`."""
  shape = tf.concat([[probes], tf.shape(x)], axis=0)
  if kind == "gaussian":
    return tf.random.stateless_normal(shape, seed=seed, dtype=x.dtype)
  if kind == "rademacher":
    bits = tf.random.stateless_uniform(shape, seed=seed, minval=0, maxval=2, dtype=tf.int32)
    return tf.cast(2 * bits - 1, x.dtype)
  raise ValueError(f"unknown probe kind {kind!r}; valid: {', '.join(PROBES)}")


def whole_sketch(sketch):
  """[B, K, P] -> [B, 1, K * P]: one row per example, so that the losses' per-row
  normalisation normalises each example's whole sketch (the estimators' normalised form)."""
  return tf.reshape(sketch, [tf.shape(sketch)[0], 1, -1])


def _tile(x, times):
  return tf.tile(x, tf.concat([[times], tf.ones([tf.rank(x) - 1], tf.int32)], axis=0))


def _flat_probes(directions):  # [P, B, ...] -> [P * B, ...], probe-major like _tile
  return tf.reshape(directions, tf.concat([[-1], tf.shape(directions)[2:]], axis=0))


def _to_sketch(per_copy, probes):
  """[P * B, K] directional derivatives -> [B, K, P] / sqrt(P)."""
  k = per_copy.shape[-1]
  stacked = tf.reshape(per_copy, [probes, -1, k])
  return tf.transpose(stacked, [1, 2, 0]) / math.sqrt(probes)


def directional_rows(fn: Callable, x, directions, *, estimator: str, eps: float,
                     outputs: Tuple[str, ...], select: Callable,
                     clean_logits: Optional[tf.Tensor] = None
                     ) -> Tuple[Dict[str, tf.Tensor], tf.Tensor, tf.Tensor, Dict[str, tf.Tensor]]:
  """The sketches of `fn`'s selected outputs along `directions`.

  fn: images -> {name: per-example tensor} holding "matching_logits" (a network view, in the
  mode the caller chose). select: clean logits (constants) -> selection weights [B, K, C].
  outputs: jacobians.OUTPUTS kinds (logits, probabilities, log_probabilities).
  clean_logits: the network's logits at x when the caller ran that pass already (the
  student's clean training pass); else the clean batch rides along in this call, and its
  outputs come back.

  Returns ({output: sketch [B, K, P]}, selection weights, clean logits, {name: clean output}
  ({} when clean_logits was given)).
  """
  probes = int(directions.shape[0])
  batch = tf.shape(x)[0]
  if estimator == "fd":
    shifted = tf.concat([_tile(x, probes) + eps * _flat_probes(directions),
                         _tile(x, probes) - eps * _flat_probes(directions)], axis=0)
    if clean_logits is None:
      out = fn(tf.concat([x, shifted], axis=0))
      clean = {k: v[:batch] for k, v in out.items()}
      logits = out["matching_logits"][batch:]
      clean_logits = clean["matching_logits"]
    else:
      clean, logits = {}, fn(shifted)["matching_logits"]
    weights = select(tf.stop_gradient(clean_logits))
    tiled = _tile(weights, 2 * probes)
    sketches = {}
    for o in outputs:
      rows = jacobians.select(jacobians.OUTPUTS[o](logits), tiled)  # [2 P B, K]
      plus, minus = tf.split(rows, 2, axis=0)
      sketches[o] = _to_sketch((plus - minus) / (2.0 * eps), probes)
    return sketches, weights, clean_logits, clean
  if estimator == "jvp":
    primal = _tile(x, probes)
    with tf.autodiff.ForwardAccumulator(primal, _flat_probes(directions)) as acc:
      out = fn(primal)
      logits = out["matching_logits"]
      clean = {}
      if clean_logits is None:
        clean = {k: v[:batch] for k, v in out.items()}
        clean_logits = clean["matching_logits"]
      weights = select(tf.stop_gradient(clean_logits))
      tiled = _tile(weights, probes)
      rows = {o: jacobians.select(jacobians.OUTPUTS[o](logits), tiled) for o in outputs}
    sketches = {}
    for o, r in rows.items():
      tangent = acc.jvp(r, unconnected_gradients=tf.UnconnectedGradients.ZERO)
      sketches[o] = _to_sketch(tangent, probes)
    return sketches, weights, clean_logits, clean
  raise ValueError(f"unknown Jacobian estimator {estimator!r}; valid: {', '.join(ESTIMATORS)}")
