"""The poster's equivalences: noise matching vs act + sigma^2 jac, the CE form, regularisation."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import linear_model
from tfjac.config import HintConfig
from tfjac.hints import losses
from tfjac.training.distiller import Distiller
from tests import helpers

RNG = np.random.default_rng(0)
W_T = RNG.normal(size=(4, 3)).astype(np.float32)
W_S = RNG.normal(size=(4, 3)).astype(np.float32)
X = RNG.random((5, 2, 2, 1)).astype(np.float32)
Y = np.array([0, 1, 2, 0, 1], np.int32)


@pytest.mark.parametrize("sigma", [0.1, 0.5])
def test_noise_matching_equals_act_plus_sigma2_jac_on_linear_models(sigma):
  t, s = linear_model(W_T, bias=[0.5, 0, -1]), linear_model(W_S)
  samples = 40000
  noisy = Distiller(s, t, hints=HintConfig.of([("noise", 1.0)], noise_sigma=sigma,
                                              noise_samples=samples))
  expanded = Distiller(
      s, t, hints=HintConfig.of([("act", 1.0), ("jac", sigma**2)], jac_target="all",
                                jac_normalize=False))
  lhs = noisy.per_example_terms(tf.constant(X), Y, training=True, step=0)[0]["noise"].numpy()
  _, rhs, _, _ = expanded.per_example_terms(tf.constant(X), Y, training=True, step=0)
  # By hand: the Jacobian of a linear model is its weight matrix.
  d = (X.reshape(5, -1) @ (W_T - W_S) + [0.5, 0, -1])
  by_hand = (d ** 2).sum(1) + sigma ** 2 * ((W_T - W_S) ** 2).sum()
  np.testing.assert_allclose(rhs, by_hand, rtol=1e-5)
  # Monte-Carlo error of a mean of 40000 draws: well under 2% here.
  np.testing.assert_allclose(lhs, by_hand, rtol=0.02)


def _float64_net(seed):
  keras.utils.set_random_seed(seed)
  inputs = keras.Input((2, 2, 1), dtype="float64")
  h = keras.layers.Dense(5, activation="tanh", dtype="float64")(keras.layers.Flatten(
      dtype="float64")(inputs))
  return keras.Model(inputs, keras.layers.Dense(3, dtype="float64", name="logits")(h))


def test_jac_ce_gradient_matches_finite_differences():
  keras.backend.set_floatx("float64")
  try:
    teacher, student = _float64_net(1), _float64_net(2)
    d = Distiller(student, teacher, hints=HintConfig.of([("jac_ce", 1.0)], jac_target="all",
                                                        noise_sigma=0.7))
    x = tf.constant(X.astype(np.float64))

    def loss():
      return d.compute_total_loss(x, Y, training=True, step=0)[0]

    kernel = student.get_layer("logits").kernel
    with tf.GradientTape() as tape:
      value = loss()
    grad = tape.gradient(value, kernel).numpy()
    assert np.abs(grad).max() > 1e-3
    numeric = helpers.finite_difference_gradient(loss, kernel)
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-8)
  finally:
    keras.backend.set_floatx("float32")


def test_jac_ce_by_hand_on_one_example():
  # T_s = 0.5, log S_s = log 0.25, grad T_s = [1, 2], grad log S_s = [3, -1], sigma = 2:
  # -0.5 * log 0.25 - 4 * (3 - 2) = 0.6931... - 4.
  a = lambda v: np.array(v, np.float32)  # noqa: E731
  value = losses.jacobian_cross_entropy(
      teacher_probabilities=a([[0.5]]), student_log_probabilities=a([[np.log(0.25)]]),
      teacher_probability_jacobian=a([[[1.0, 2.0]]]),
      student_log_probability_jacobian=a([[[3.0, -1.0]]]), sigma=2.0)
  np.testing.assert_allclose(value, [-0.5 * np.log(0.25) - 4.0], rtol=1e-6)


def test_jacnorm_on_a_linear_model_is_sigma2_times_squared_weights():
  s = linear_model(W_S)
  d = Distiller(s, None, hints=HintConfig.of([("jacnorm", 1.0)], jac_target="all", noise_sigma=0.3))
  terms = d.per_example_terms(tf.constant(X), Y, training=True, step=0)[0]
  np.testing.assert_allclose(terms["jacnorm"], [0.09 * (W_S ** 2).sum()] * 5, rtol=1e-5)


def test_regularize_lowers_the_jacobian_norm(digits_splits):
  from tfjac.config import TrainConfig  # pylint: disable=g-import-not-at-top
  from tfjac.training import loop  # pylint: disable=g-import-not-at-top
  info = digits_splits.info
  train = digits_splits.sampled_train(20, 0)
  x = tf.constant(digits_splits.test.images[:200])
  y = tf.constant(digits_splits.test.labels[:200])
  norms = {}
  for hints in ((("ce", 1.0),), (("ce", 1.0), ("jacnorm", 1.0))):
    keras.utils.set_random_seed(0)
    student = helpers.tiny_vgg(info)
    d = Distiller(student, None, hints=HintConfig.of(hints, noise_sigma=0.5))
    loop.fit(d, train, digits_splits.validation, TrainConfig(epochs=15),
             loop.FitDirs("/tmp/tfjac-test-tb", f"/tmp/tfjac-test-ck{len(hints)}"))
    probe = Distiller(student, None, hints=HintConfig.of([("jacnorm", 1.0)], noise_sigma=1.0))
    _, _, _, inputs = probe.per_example_terms(x, y, training=False, step=0)
    norms[len(hints)] = float(tf.reduce_mean(tf.norm(inputs.student_jacobians["logits"],
                                                     axis=[1, 2])))
  assert norms[2] < 0.7 * norms[1], norms


def test_noise_equivalence_tool(tmp_path):
  bad = helpers.run_cli(f"--run_dir={tmp_path}", tool="noise_equivalence", timeout=300)
  assert bad.returncode == 2 and "--run_dir:" in bad.stderr and "no results.json" in bad.stderr
  ok = helpers.run_cli("--sigmas=0.1,0.5", "--samples=2000", f"--out={tmp_path}",
                       tool="noise_equivalence", timeout=300)
  assert ok.returncode == 0, ok.stderr[-2000:]
  import json  # pylint: disable=g-import-not-at-top
  with open(tmp_path / "equivalence.json") as f:
    rows = json.load(f)["results"]["linear models"]
  for row in rows:  # linear models: equal up to Monte-Carlo error
    assert abs(row["noisy_matching"] - row["act_plus_sigma2_jac"]) < 4 * row["noisy_matching_se"]
  assert (tmp_path / "equivalence.png").stat().st_size > 10000


# --- BatchNorm in the noisy passes (distiller.py: the clean batch's statistics) ---------------

from tests import helpers_bn  # noqa: E402  pylint: disable=g-import-not-at-top

XB = RNG.random((5, 2, 2, 1)).astype(np.float32)  # D = 4


def _bn_pair(seed=3):
  """A BatchNorm student and a linear teacher that agrees with it on XB up to a constant
  offset (so act is small beside the noise term: less Monte-Carlo error in the tests)."""
  rng = np.random.default_rng(seed)
  student = helpers_bn.bn_network(rng, XB, hidden=(6,), classes=3)
  s = helpers_bn.forward(student, XB, helpers_bn.batch_statistics(student, XB))
  affine = np.linalg.solve(np.concatenate([XB.reshape(5, -1), np.ones((5, 1))], 1), s)
  teacher = linear_model(affine[:4], bias=affine[4] + [0.3, -0.2, 0.1], name="teacher")
  return student, teacher


def test_noisy_passes_use_the_clean_batch_statistics():
  # By hand: the noisy pass is the function of each example alone with the clean batch's
  # mean/variance as constants; the moving statistics move once, towards the clean batch's.
  student, teacher = _bn_pair()
  clean = helpers_bn.batch_statistics(student, XB)
  d = Distiller(student, teacher, hints=HintConfig.of([("noise", 1.0)], noise_sigma=0.1,
                                                      noise_samples=3))
  _, _, _, inputs = d.per_example_terms(tf.constant(XB), Y, training=True, step=0)
  after_clean = helpers_bn.moving_statistics(student)
  other = RNG.random((7, 2, 2, 1)).astype(np.float32)  # any inputs, any batch size
  got = inputs.student_fn(tf.constant(other)).numpy()
  np.testing.assert_allclose(got, helpers_bn.forward(student, other, clean), rtol=1e-5,
                             atol=1e-5)
  for (mean, var), (m_mean, m_var) in zip(clean, helpers_bn.moving_statistics(student)):
    np.testing.assert_allclose(m_mean, 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m_var, 0.9 + 0.1 * var, rtol=1e-5, atol=1e-6)
  for a, b in zip(after_clean, helpers_bn.moving_statistics(student)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("hints, policy", [
    ((("noise", 1.0),), "batch_stats"),
    ((("noisy_ce", 1.0),), "batch_stats"),
    ((("noise", 1.0), ("jac", 1.0)), "inference"),
    ((("ce", 1.0),), "batch_stats"),  # the reference: an ordinary step
])
def test_moving_statistics_after_a_step_describe_the_clean_batch(hints, policy):
  student, teacher = _bn_pair()
  clean = helpers_bn.batch_statistics(student, XB)  # with the weights before the step
  needs_teacher = any(n in ("noise", "jac") for n, _ in hints)
  d = Distiller(student, teacher if needs_teacher else None,
                hints=HintConfig.of(hints, jac_bn_policy=policy, noise_sigma=0.3, noise_samples=4))
  d.compile(optimizer=keras.optimizers.SGD(0.1))
  d.fit(tf.data.Dataset.from_tensor_slices((XB, Y)).batch(5), epochs=1, verbose=0)
  assert int(d.optimizer.iterations) == 1
  for (mean, var), (m_mean, m_var) in zip(clean, helpers_bn.moving_statistics(student)):
    np.testing.assert_allclose(m_mean, 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m_var, 0.9 + 0.1 * var, rtol=1e-5, atol=1e-6)


def test_noise_tends_to_act_plus_sigma2_raw_jac_on_a_batchnorm_network():
  # ReLU + BatchNorm student (statistics of the clean batch), linear teacher. By hand:
  # act = ||T - S||^2, J_S = the chain rule with the batch statistics as constants, all classes.
  # Every example sits inside one linear region (helpers_bn), so the relative error of
  # (noise - act) against sigma^2 ||J_T - J_S||^2 shrinks to Monte-Carlo error with sigma.
  student, teacher = _bn_pair()
  clean = helpers_bn.batch_statistics(student, XB)
  w_t, b_t = teacher.get_layer("logits").get_weights()
  diff = XB.reshape(5, -1) @ w_t + b_t - helpers_bn.forward(student, XB, clean)
  act = (diff ** 2).sum(1)
  jac = ((w_t[None] - helpers_bn.jacobian(student, XB, clean)) ** 2).sum((1, 2))
  errors = {}
  for sigma in (0.5, 0.02):
    state = student.get_weights()
    d = Distiller(student, teacher, hints=HintConfig.of([("noise", 1.0)], noise_sigma=sigma,
                                                        noise_samples=200000))
    noise = d.per_example_terms(tf.constant(XB), Y, training=True, step=0)[0]["noise"].numpy()
    student.set_weights(state)
    errors[sigma] = np.abs((noise - act) / (sigma ** 2 * jac) - 1).max()
  assert errors[0.02] < 0.03, errors  # Monte-Carlo standard error here: under 0.006
  assert errors[0.5] > 3 * errors[0.02], errors


# --- noisy_ce and jac_ce against the noisy cross-entropies they stand for -------------------

def _softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def test_noisy_ce_is_the_cross_entropy_on_noisy_inputs_not_ce_plus_jacnorm():
  # Linear student z = x W + b. By hand: a numpy Monte-Carlo of E[CE(y, z(x + xi))] with its
  # own draws, and the second-order value CE + sigma^2/2 tr(H), H = W (diag p - p p^T) W^T.
  sigma, samples = 0.3, 100000
  bias = np.array([0.3, -0.2, 0.1], np.float32)
  d = Distiller(
      linear_model(W_S, bias=bias), None,
      hints=HintConfig.of([("noisy_ce", 1.0)], noise_sigma=sigma, noise_samples=samples))
  got = d.per_example_terms(tf.constant(X), Y, training=True, step=0)[0]["noisy_ce"].numpy()
  flat = X.reshape(5, -1).astype(np.float64)
  rng = np.random.default_rng(11)
  draws = np.stack([-np.log(_softmax((flat + sigma * rng.normal(size=flat.shape)) @ W_S
                                     + bias)[np.arange(5), Y]) for _ in range(20000)])
  se = draws.std(0) * np.sqrt(1 / samples + 1 / len(draws))
  np.testing.assert_array_less(np.abs(got - draws.mean(0)), 4 * se)
  p = _softmax(flat @ W_S + bias)
  ce = -np.log(p[np.arange(5), Y])
  trace = (p * (W_S ** 2).sum(0)).sum(1) - ((p @ W_S.T) ** 2).sum(1)
  second_order = ce + sigma ** 2 / 2 * trace
  jacnorm = ce + sigma ** 2 * (W_S[:, Y] ** 2).sum(0)  # ce,jacnorm with the label target
  np.testing.assert_allclose(got, second_order, rtol=0.02)
  assert np.all(np.abs(jacnorm - second_order) > 10 * se)  # a cousin, not the same loss


def test_jac_ce_is_the_noisy_soft_cross_entropy_less_its_curvature_terms():
  # f(x) = -sum_s T_s(x) log S_s(x) (linear teacher and student, all classes). By finite
  # differences in numpy: the gradients (jac_ce's sigma^2 term) and the Laplacian of f; an
  # antithetic numpy Monte-Carlo of E[f(x + xi)] ~ f + sigma^2/2 lap f at small sigma. jac_ce
  # keeps -sigma^2 grad T . grad log S of that expansion and drops the curvature terms.
  sigma = 0.05
  b_t, b_s = np.array([0.5, 0, -1.0]), np.array([0.2, 0.1, 0.0])
  d = Distiller(
      linear_model(W_S, bias=b_s), linear_model(W_T, bias=b_t),
      hints=HintConfig.of([("jac_ce", 1.0)], jac_target="all", noise_sigma=sigma))
  got = d.per_example_terms(tf.constant(X), Y, training=True, step=0)[0]["jac_ce"].numpy()
  flat = X.reshape(5, -1).astype(np.float64)
  t_prob = lambda x: _softmax(x @ W_T + b_t)  # noqa: E731
  s_logp = lambda x: np.log(_softmax(x @ W_S + b_s))  # noqa: E731
  f = lambda x: -(t_prob(x) * s_logp(x)).sum(-1)  # noqa: E731
  h, eye = 1e-4, np.eye(flat.shape[1])
  grad = lambda g: np.stack([(g(flat + h * e) - g(flat - h * e)) / (2 * h) for e in eye], 1)  # noqa: E731
  cross = -(grad(t_prob) * grad(s_logp)).sum((1, 2))  # -sum_s grad T_s . grad log S_s
  np.testing.assert_allclose(got, f(flat) + sigma ** 2 * cross, rtol=1e-5, atol=1e-6)
  hh = 1e-3
  laplacian = sum((f(flat + hh * e) - 2 * f(flat) + f(flat - hh * e)) / hh ** 2 for e in eye)
  rng = np.random.default_rng(5)
  xi = sigma * rng.normal(size=(200000, 1, flat.shape[1]))
  noisy = ((f(flat[None] + xi) + f(flat[None] - xi)) / 2).mean(0)
  np.testing.assert_allclose((noisy - f(flat)) / sigma ** 2, laplacian / 2, rtol=0.03)
  curvature = laplacian / 2 - cross  # what jac_ce drops, per example
  assert np.all(np.abs(curvature) > 0.2 * np.abs(cross))
  np.testing.assert_allclose((noisy - got) / sigma ** 2, curvature, rtol=0.05, atol=0.01)
