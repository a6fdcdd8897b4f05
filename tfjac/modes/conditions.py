"""Mode conditions: the poster's three conditions for Learning without Forgetting to help,
measured before any training:

1. the teacher's loss on its source data (cross-entropy and accuracy on the source test split,
   when the source data, `source`, is given);
2. the teacher's Lipschitz constant on the target data, estimated by per-example input-gradient
   norms: the spectral norm of the whole logit Jacobian (power iteration; a lower bound of the
   local Lipschitz constant in L2) and the gradient norm of the top-1 logit, max and
   percentiles;
3. a distance between source and target data in the teacher's feature space (the input of its
   last Dense layer, or its logits for a SavedModel): Frechet distance between Gaussian fits and
   the RBF-kernel MMD^2 (median bandwidth), with the same numbers for two halves of the source
   as a reference scale.

The images measured are a seeded (data.seed), class-stratified sample of each test split, not its
first n: folder and MIT Indoor splits are stored class by class, so the first 500 images would
cover a third of the classes. The two source halves split every sampled class in two, so both
halves cover the same classes and the reference compares like with like.
"""
import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tfjac import data, errors
from tfjac.models import teachers
from tfjac.models import views
from tfjac.modes import Mode, common
from tfjac.training import evaluation
from tfjac.training.distiller import Distiller

POWER_ITERATIONS = 30
PERCENTILES = (50, 90, 99)


def spectral_norms(model, x, iterations=POWER_ITERATIONS, seed=0):
  """Per-example largest singular value of d model(x)/dx ([C, D]), by power iteration with one
  forward-mode (J v) and one reverse-mode (J^T u) product per step."""
  x = tf.convert_to_tensor(x, tf.float32)
  v = tf.random.stateless_normal(tf.shape(x), seed=[seed, 0])
  sigma = None
  for _ in range(iterations):
    v = v / tf.norm(tf.reshape(v, [tf.shape(v)[0], -1]), axis=1)[:, None, None, None]
    with tf.autodiff.ForwardAccumulator(x, v) as acc:
      out = model(x, training=False)
    jv = acc.jvp(out)  # [B, C]
    sigma = tf.norm(jv, axis=1)
    with tf.GradientTape() as tape:
      tape.watch(x)
      out = model(x, training=False)
      projected = tf.reduce_sum(tf.stop_gradient(jv) * out)
    v = tape.gradient(projected, x)  # J^T J v
  return sigma.numpy()


def top1_gradient_norms(model, x):
  x = tf.convert_to_tensor(x, tf.float32)
  with tf.GradientTape() as tape:
    tape.watch(x)
    out = model(x, training=False)
    top = tf.reduce_sum(tf.reduce_max(out, axis=-1))
  g = tape.gradient(top, x)
  return tf.norm(tf.reshape(g, [tf.shape(g)[0], -1]), axis=1).numpy()


def stratified_sample(labels, n, seed):
  """Seeded sample of min(n, len(labels)) indices, stratified by class: each class's share is
  proportional to its size (largest remainder, so the total is exactly n), drawn without
  replacement. Returns one index array per class present (empty arrays for classes given no
  image when n is smaller than the number of classes)."""
  labels = np.asarray(labels)
  classes, counts = np.unique(labels, return_counts=True)
  n = min(int(n), len(labels))
  quota = n * counts / len(labels)
  take = np.floor(quota).astype(int)
  # Largest fractional parts first; ties to the larger class, then the lower class index.
  order = np.lexsort((classes, -counts, -(quota - take)))
  take[order[:n - take.sum()]] += 1
  rng = np.random.default_rng(seed)
  return [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]


def halves(per_class):
  """Two index arrays splitting each class of `per_class` in two (an odd class's extra image
  goes to the halves in turn), so both halves hold the same classes in equal shares."""
  a, b, extra_to_a = [], [], True
  for idx in per_class:
    cut = len(idx) // 2 + (len(idx) % 2 if extra_to_a else 0)
    extra_to_a ^= bool(len(idx) % 2)
    a.append(idx[:cut])
    b.append(idx[cut:])
  return np.concatenate(a), np.concatenate(b)


def _coverage(labels, indices):
  return {"examples": int(len(indices)), "classes": int(len(np.unique(labels[indices])))}


def _summary(values):
  return {"max": float(np.max(values)), "mean": float(np.mean(values)),
          **{f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES}}


def feature_model(network: keras.Model, adapted: keras.Model, image_shape, adapt):
  """Images -> the teacher's penultimate features (its logits when it has no layers).
  `adapt`: config.TeacherInput, or a models.teachers.Teacher (its own adapter)."""
  try:
    body = keras.Model(network.inputs[0], views.penultimate(network))
  except ValueError:
    return adapted, "logits"
  if hasattr(adapt, "adapt"):
    return adapt.adapt(body), "penultimate"
  return views.adapt_input(body, image_shape, resize=adapt.resize, scale=adapt.scale,
                           offset=adapt.offset), "penultimate"


def _batched(fn, x, batch=256):
  return np.concatenate([np.asarray(fn(x[i:i + batch])) for i in range(0, len(x), batch)])


def frechet_distance(a, b):
  """||mu_a - mu_b||^2 + tr(Ca + Cb - 2 (Ca Cb)^1/2) between Gaussian fits of the rows."""
  mu = a.mean(0) - b.mean(0)
  ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  ca, cb = np.atleast_2d(ca), np.atleast_2d(cb)
  eig = np.linalg.eigvals(ca @ cb)  # of a product of PSD matrices: real and >= 0
  root_trace = np.sqrt(np.clip(eig.real, 0, None)).sum()
  return float(mu @ mu + np.trace(ca) + np.trace(cb) - 2 * root_trace)


def mmd2(a, b, bandwidth=None):
  """Unbiased RBF-kernel MMD^2; bandwidth: the median pairwise distance of the pooled rows."""
  pooled = np.concatenate([a, b])
  d2 = lambda p, q: np.maximum(  # noqa: E731
      (p ** 2).sum(1)[:, None] + (q ** 2).sum(1)[None] - 2 * p @ q.T, 0)
  if bandwidth is None:
    bandwidth = float(np.sqrt(np.median(d2(pooled, pooled)[np.triu_indices(len(pooled), 1)])))
  k = lambda p, q: np.exp(-d2(p, q) / (2 * bandwidth ** 2 + 1e-12))  # noqa: E731
  kaa, kbb, kab = k(a, a), k(b, b), k(a, b)
  n, m = len(a), len(b)
  return float((kaa.sum() - np.trace(kaa)) / (n * (n - 1)) +
               (kbb.sum() - np.trace(kbb)) / (m * (m - 1)) - 2 * kab.mean()), bandwidth


def run(config, splits, strategy):
  del strategy  # measurements only
  info, n = splits.info, config.conditions_examples
  adapt = teachers.load_teacher(config, info)
  network, teacher, source_classes = adapt.network, adapt.adapted, adapt.num_outputs
  seed = config.data.seed
  target_idx = np.sort(np.concatenate(stratified_sample(splits.test.labels, n, seed)))
  target_x = splits.test.images[target_idx]
  result = {"teacher": {"path": config.teacher.path, "source_classes": source_classes},
            "target": {"dataset": info.name, **_coverage(splits.test.labels, target_idx),
                       "of_classes": info.num_classes}}

  logging.info("estimating the teacher's Lipschitz constant on %d target images", len(target_x))
  spectral = _batched(lambda b: spectral_norms(teacher, b, seed=config.data.seed), target_x)
  top1 = _batched(lambda b: top1_gradient_norms(teacher, b), target_x)
  result["lipschitz"] = {"jacobian_spectral_norm": _summary(spectral),
                         "top1_gradient_norm": _summary(top1)}

  features, kind = feature_model(network, teacher, info.image_shape, adapt)
  target_f = _batched(lambda b: features(b, training=False), target_x)
  give = errors.say(f"give {errors.mention('source.dataset')} (the teacher's own data) to "
                    "measure the teacher's source loss and the source/target distance")
  result["distance"] = {"feature_space": kind, "source": None, "note": give}
  if config.source is not None:
    source = data.prepare(config.source)
    if source.info.num_classes != source_classes:
      result["source_loss"] = {"error": f"{source.info.name} has {source.info.num_classes} "
                                        f"classes, the teacher {source_classes}"}
    else:
      loss_idx = np.sort(np.concatenate(stratified_sample(source.test.labels, 4 * n, seed)))
      metrics = evaluation.evaluate(Distiller(teacher, None), source.test.take(loss_idx),
                              config.train.batch_size)
      result["source_loss"] = {"dataset": source.info.name,
                               **_coverage(source.test.labels, loss_idx),
                               "cross_entropy": metrics["ce_loss"],
                               "accuracy": metrics["accuracy"]}
    # seed + 1: when the source is the target dataset, its sample is other images than the
    # target's (a distance of 0 between identical images would say nothing).
    half_a, half_b = halves(stratified_sample(source.test.labels, n, seed + 1))
    source_idx = np.concatenate([half_a, half_b])
    source_f = _batched(lambda b: features(b, training=False), source.test.images[source_idx])
    f_a, f_b = source_f[:len(half_a)], source_f[len(half_a):]
    m, bw = mmd2(source_f, target_f)
    m_ref, _ = mmd2(f_a, f_b, bandwidth=bw)
    result["distance"] = {
        "feature_space": kind, "source": source.info.name,
        "source_sample": _coverage(source.test.labels, source_idx),
        "source_halves": [_coverage(source.test.labels, h) for h in (half_a, half_b)],
        "frechet": frechet_distance(source_f, target_f),
        "frechet_source_halves": frechet_distance(f_a, f_b),
        "mmd2": m, "mmd2_source_halves": m_ref, "mmd_bandwidth": bw}
  return {"conditions": result}


def summary_lines(results):
  pct = common.pct
  c = results["conditions"]
  lines = [f"  teacher: {c['teacher']['path']} ({c['teacher']['source_classes']} source classes)"]
  src = c.get("source_loss")
  if src and "error" not in src:
    lines.append(f"  1. teacher's loss on its source data ({src['dataset']}): cross-entropy "
                 f"{src['cross_entropy']:.4g}, accuracy {pct(src['accuracy'])}")
  else:
    lines.append("  1. teacher's source loss: " + (src or {}).get(
        "error", "not measured (give --source_dataset)"))
  lip = c["lipschitz"]["jacobian_spectral_norm"]
  top = c["lipschitz"]["top1_gradient_norm"]
  lines.append(f"  2. teacher's Lipschitz estimate on {c['target']['examples']} target images "
               f"({c['target']['classes']} classes, stratified): "
               f"Jacobian spectral norm max {lip['max']:.4g}, p50 {lip['p50']:.4g}, p99 "
               f"{lip['p99']:.4g}; top-1 gradient norm max {top['max']:.4g}")
  d = c["distance"]
  if d.get("source"):
    lines.append(f"  3. source/target distance ({d['feature_space']} features): Frechet "
                 f"{d['frechet']:.4g} (source halves: {d['frechet_source_halves']:.4g}), MMD^2 "
                 f"{d['mmd2']:.4g} (source halves: {d['mmd2_source_halves']:.4g})")
  else:
    lines.append("  3. source/target distance: " + d["note"])
  return lines + common.summary_lines(results)


MODE = Mode(run=run, summary_lines=summary_lines, default_hints=("ce",), needs_teacher=True,
            builds_student=False)  # measurements only: no fit, no cache
