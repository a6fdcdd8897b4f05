"""Small BatchNorm networks (Dense -> JacobianSafeBatchNorm -> activation, repeated, -> Dense)
evaluated by hand in numpy (float64), with the BatchNorm statistics given as constants."""
import keras
import numpy as np

from tfjac.models.layers import JacobianSafeBatchNorm

_ACT = {"relu": (lambda z: np.maximum(z, 0.0), lambda z: (z > 0).astype(np.float64)),
        "tanh": (np.tanh, lambda z: 1.0 - np.tanh(z) ** 2)}


def bn_network(rng, x, *, hidden=(6,), classes=3, activation="relu", momentum=0.9,
               name="bn_student"):
  """Random weights; gamma/beta not 1/0. For relu, each unit's beta puts its kink in the middle
  of the widest gap between the batch x's normalised values, so every example sits well inside
  one linear region (the first-order noise expansion is then exact for small noise)."""
  inputs = keras.Input(shape=x.shape[1:], name="image")
  h = keras.layers.Flatten()(inputs)
  for i, width in enumerate(hidden):
    h = keras.layers.Dense(width, name=f"hidden{i}")(h)
    h = JacobianSafeBatchNorm(momentum=momentum, name=f"bn{i}")(h)
    h = keras.layers.Activation(activation)(h)
  model = keras.Model(inputs, keras.layers.Dense(classes, name="logits")(h), name=name)
  a = x.reshape(len(x), -1).astype(np.float64)
  for i, width in enumerate(hidden):
    dense = model.get_layer(f"hidden{i}")
    w = rng.normal(size=(a.shape[1], width))
    b = 0.1 * rng.normal(size=width)
    dense.set_weights([w.astype(np.float32), b.astype(np.float32)])
    bn = model.get_layer(f"bn{i}")
    gamma = rng.uniform(0.6, 1.4, width)
    pre = a @ w + b
    u = (pre - pre.mean(0)) / np.sqrt(pre.var(0) + bn.epsilon)
    if activation == "relu":
      s = np.sort(u, axis=0)
      gap = np.argmax(np.diff(s, axis=0), axis=0)
      cols = np.arange(width)
      beta = -gamma * (s[gap, cols] + s[gap + 1, cols]) / 2
    else:
      beta = 0.5 * rng.normal(size=width)
    bn.set_weights([gamma.astype(np.float32), beta.astype(np.float32),
                    np.zeros(width, np.float32), np.ones(width, np.float32)])
    a = _ACT[activation][0](gamma * u + beta)
  out = model.get_layer("logits")
  out.set_weights([rng.normal(size=(a.shape[1], classes)).astype(np.float32),
                   (0.1 * rng.normal(size=classes)).astype(np.float32)])
  return model


def _params(model, i):
  w, b = (v.astype(np.float64) for v in model.get_layer(f"hidden{i}").get_weights())
  bn = model.get_layer(f"bn{i}")
  gamma, beta, moving_mean, moving_var = (v.astype(np.float64) for v in bn.get_weights())
  return w, b, gamma, beta, moving_mean, moving_var, bn.epsilon


def _depth(model):
  return sum(1 for layer in model.layers if layer.name.startswith("bn"))


def batch_statistics(model, x):
  """[(mean, variance)] of each BatchNorm layer's input over the batch x (biased variance, as
  BatchNorm's), computed layer by layer in numpy."""
  a, stats = x.reshape(len(x), -1).astype(np.float64), []
  activation = _activation(model)
  for i in range(_depth(model)):
    w, b, gamma, beta, _, _, eps = _params(model, i)
    pre = a @ w + b
    stats.append((pre.mean(0), pre.var(0)))
    a = _ACT[activation][0](gamma * (pre - pre.mean(0)) / np.sqrt(pre.var(0) + eps) + beta)
  return stats


def moving_statistics(model):
  return [tuple(_params(model, i)[4:6]) for i in range(_depth(model))]


def _activation(model):
  for layer in model.layers:
    if isinstance(layer, keras.layers.Activation):
      return layer.get_config()["activation"]
  raise ValueError("no activation")


def forward(model, x, stats):
  """Logits [B, C] of each example of x alone, with BatchNorm statistics `stats` as constants."""
  a = x.reshape(len(x), -1).astype(np.float64)
  activation = _activation(model)
  for i, (mean, var) in enumerate(stats):
    w, b, gamma, beta, _, _, eps = _params(model, i)
    a = _ACT[activation][0](gamma * (a @ w + b - mean) / np.sqrt(var + eps) + beta)
  w, b = (v.astype(np.float64) for v in model.get_layer("logits").get_weights())
  return a @ w + b


def jacobian(model, x, stats):
  """[B, D, C]: d logits_c / d x_d per example, with the statistics as constants (chain rule)."""
  a = x.reshape(len(x), -1).astype(np.float64)
  jac = np.tile(np.eye(a.shape[1])[None], [len(a), 1, 1])  # d a / d x: [B, D, width]
  activation = _activation(model)
  for i, (mean, var) in enumerate(stats):
    w, b, gamma, beta, _, _, eps = _params(model, i)
    z = gamma * (a @ w + b - mean) / np.sqrt(var + eps) + beta
    slope = _ACT[activation][1](z) * gamma / np.sqrt(var + eps)  # [B, width]
    jac = np.einsum("bdk,kh,bh->bdh", jac, w, slope)
    a = _ACT[activation][0](z)
  return jac @ model.get_layer("logits").get_weights()[0].astype(np.float64)
