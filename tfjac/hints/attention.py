"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017): the attention map of a feature tensor
is the channel-mean of its squared activations, flattened and L2-normalised. Teacher and student
maps are paired by position; where their spatial sizes differ both are resized (area) to the
smaller size."""
import numpy as np
import tensorflow as tf


def attention_map(features):
  """[B, H, W, C] -> [B, H, W]: channel-mean of squared activations (not normalised)."""
  return tf.reduce_mean(tf.square(features), axis=-1)


def pair_sizes(teacher_shapes, student_shapes):
  """[h, w] per pair: the smaller of the two spatial sizes."""
  return [[min(t[1], s[1]), min(t[2], s[2])] for t, s in zip(teacher_shapes, student_shapes)]


def _area_matrix(n_in, n_out):
  """[n_out, n_in]: output pixel i averages the input interval [i, i + 1) * n_in / n_out,
  each input pixel weighted by its overlap (area resampling, as tf.image.resize 'area')."""
  a = np.zeros((n_out, n_in), np.float32)
  step = n_in / n_out
  for i in range(n_out):
    lo, hi = i * step, (i + 1) * step
    for j in range(int(np.floor(lo)), min(n_in, int(np.ceil(hi)))):
      a[i, j] = (min(hi, j + 1) - max(lo, j)) / step
  return a


def flat_map(features, size):
  """[B, H, W, C] -> [B, h * w]: the attention map, resized (area) to `size` if needed.
  The resize is two constant matrix products, not tf.image.resize: TF registers no gradient
  for ResizeArea, and the student's map must be differentiated (twice for at_jac)."""
  m = attention_map(features)
  h, w = int(m.shape[1]), int(m.shape[2])
  if [h, w] != list(size):
    m = tf.einsum("ih,bhw,jw->bij", _area_matrix(h, int(size[0])), m,
                  _area_matrix(w, int(size[1])))
  return tf.reshape(m, [tf.shape(m)[0], -1])


def resized_maps(teacher_features, student_features):
  """[(teacher map, student map)], each [B, P] at the pair's common size, unnormalised."""
  sizes = pair_sizes([t.shape for t in teacher_features], [s.shape for s in student_features])
  return [(flat_map(t, size), flat_map(s, size))
          for t, s, size in zip(teacher_features, student_features, sizes)]


def _unit(v, eps=1e-12):
  return v / tf.sqrt(tf.reduce_sum(tf.square(v), axis=-1, keepdims=True) + eps)


def attention_transfer(*, teacher_features, student_features):
  """sum over layer pairs of mean over pixels of (Q_S - Q_T)^2, Q = map / ||map||.

  The mean over pixels follows the authors' code, where the reference weight 1e3 was tuned.
  """
  terms = [tf.reduce_mean(tf.square(_unit(s) - _unit(tf.stop_gradient(t))), axis=-1)
           for t, s in resized_maps(teacher_features, student_features)]
  return tf.add_n(terms)


def peak_pixels(teacher_maps):
  """[B, L]: for each pair, the pixel where the teacher's attention map is largest."""
  return tf.stack([tf.argmax(t, axis=-1, output_type=tf.int32) for t in teacher_maps], axis=1)


def values_at(maps, pixels):
  """L tensors [B]: map l at pixel pixels[:, l]."""
  return [tf.gather(m, pixels[:, i], axis=1, batch_dims=1) for i, m in enumerate(maps)]
