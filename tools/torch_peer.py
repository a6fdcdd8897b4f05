"""The benchmark's PyTorch peer: tfjac's distillation step written plainly in PyTorch eager.

Same networks as tfjac.models (the VGG layouts of tfjac/models/vgg.py: 3x3 conv without bias,
BatchNorm with Keras' epsilon 1e-3, ReLU, 2x2 max-pool skipped below 2x2, global average pool,
dense logits; standardisation inside the model), same losses (tfjac/hints/losses.py: ce, act,
kd, jac with the L2-normalised Jacobians at the label class and the same epsilon), same
optimizer. The teacher runs in eval mode at every step (its Jacobian needs no second-order
graph); the student's Jacobian is taken with create_graph=True (double backprop).

One difference, in the plain PyTorch way: in training mode the student's Jacobian goes through
the batch statistics of BatchNorm (cross-example terms of order 1/batch size), where tfjac's
default --jac_bn_policy=batch_stats holds them constant for the input gradient. The passes and
so the cost are the same; the values differ by those terms. In eval mode (moving statistics)
the two compute the same numbers (tests/test_bench_peer.py checks it on tiny shared weights).

Precision: the configuration's mixed_precision is matched with torch.autocast (mixed_bfloat16:
bfloat16, mixed_float16: float16 with a GradScaler), the logits taken back to float32 as
tfjac's float32 logits layer, so tfjac / torch compares like with like. Device: CUDA when torch
sees a GPU, else the CPU (a CPU-only torch on a GPU machine times the CPU: the benchmark says
which device the peer ran on).

Only tools/benchmark.py (--peer=torch) and that test import this; torch is the optional extra
`pip install -e .[bench]`, never needed by the package.
"""
import contextlib
import time

import numpy as np
import torch
import torch.nn.functional as F

JACOBIAN_EPS = 1e-12  # tfjac/hints/losses.py
BN_EPS = 1e-3  # keras.layers.BatchNormalization's default
HINTS = ("ce", "act", "kd", "jac")
AUTOCAST = {"float32": None, "mixed_bfloat16": torch.bfloat16, "mixed_float16": torch.float16}


def device():
  return "cuda" if torch.cuda.is_available() else "cpu"


def autocast(dtype, device_type="cpu"):
  """tfjac's mixed precision in torch: autocast to `dtype` (None: float32, no autocast)."""
  if dtype is None:
    return contextlib.nullcontext()
  return torch.autocast(device_type=device_type, dtype=dtype)


class VGG(torch.nn.Module):
  """tfjac/models/vgg.py's build_vgg, NCHW."""

  def __init__(self, layout, image_size, channels, num_classes, *, mean, std, width=1.0):
    super().__init__()
    self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
    self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
    layers, size, c = [], image_size, channels
    for item in layout:
      if item == "M":
        if size >= 2:
          layers.append(torch.nn.MaxPool2d(2))
          size //= 2
        continue
      filters = max(1, int(round(item * width)))
      layers += [torch.nn.Conv2d(c, filters, 3, padding=1, bias=False),
                 torch.nn.BatchNorm2d(filters, eps=BN_EPS, momentum=0.1),
                 torch.nn.ReLU()]
      c = filters
    self.features = torch.nn.Sequential(*layers)
    self.logits = torch.nn.Linear(c, num_classes)

  def forward(self, x):  # x: NCHW in [0, 1]
    h = self.features((x - self.mean) / self.std)
    return self.logits(h.mean(dim=(2, 3)))


def copy_from_keras(net: VGG, keras_model):
  """Loads a tfjac.models VGG's weights (Keras, NHWC) into `net`."""
  convs = [m for m in net.features if isinstance(m, torch.nn.Conv2d)]
  bns = [m for m in net.features if isinstance(m, torch.nn.BatchNorm2d)]
  k_convs = [l for l in keras_model.layers if l.__class__.__name__ == "Conv2D"]
  k_bns = [l for l in keras_model.layers if "BatchNorm" in l.__class__.__name__]
  assert len(convs) == len(k_convs) and len(bns) == len(k_bns)
  with torch.no_grad():
    for m, l in zip(convs, k_convs):
      m.weight.copy_(torch.from_numpy(np.transpose(l.get_weights()[0], (3, 2, 0, 1)).copy()))
    for m, l in zip(bns, k_bns):
      gamma, beta, mean, var = l.get_weights()
      for t, v in ((m.weight, gamma), (m.bias, beta), (m.running_mean, mean),
                   (m.running_var, var)):
        t.copy_(torch.from_numpy(v))
    kernel, bias = keras_model.get_layer("logits").get_weights()
    net.logits.weight.copy_(torch.from_numpy(kernel.T.copy()))
    net.logits.bias.copy_(torch.from_numpy(bias))


def _unit(j):
  return j / torch.sqrt(torch.sum(j * j, dim=1, keepdim=True) + JACOBIAN_EPS)


def per_example_terms(student, teacher, x, y, hints, *, training, kd_temperature=4.0,
                      precision=None):
  """{hint: [batch] loss} of tfjac's hints; `training`: the student's mode (the teacher is
  always in eval mode); `precision`: the autocast dtype (None: float32)."""
  with autocast(precision, x.device.type):
    return _terms(student, teacher, x, y, hints, training=training,
                  kd_temperature=kd_temperature)


def _terms(student, teacher, x, y, hints, *, training, kd_temperature):
  teacher.eval()
  student.train(training)
  need_jac = "jac" in hints
  batch = torch.arange(x.shape[0])
  xt = x.detach().requires_grad_(need_jac)
  t = teacher(xt).float()
  t_jac = None
  if need_jac:
    t_jac = torch.autograd.grad(t[batch, y].sum(), xt)[0].flatten(1)
  t = t.detach()
  xs = x.detach().requires_grad_(need_jac)
  s = student(xs).float()
  terms = {}
  if "ce" in hints:
    terms["ce"] = F.cross_entropy(s, y, reduction="none")
  if "act" in hints:
    terms["act"] = torch.sum((t - s) ** 2, dim=1)
  if "kd" in hints:
    tau = kd_temperature
    t_log_p, s_log_p = F.log_softmax(t / tau, -1), F.log_softmax(s / tau, -1)
    terms["kd"] = torch.sum(t_log_p.exp() * (t_log_p - s_log_p), -1) * tau ** 2
  if need_jac:  # double backprop: the student's Jacobian stays in the graph
    s_jac = torch.autograd.grad(s[batch, y].sum(), xs, create_graph=True)[0].flatten(1)
    terms["jac"] = torch.sum((_unit(t_jac) - _unit(s_jac)) ** 2, dim=1)
  return terms


def time_step(cfg):
  """Times cfg's step (tools/benchmark.py's configuration dict) in this process; returns
  {ms_per_step, images_per_s, ms_per_step_all, torch}."""
  from tfjac.models.vgg import LAYOUTS  # pylint: disable=g-import-not-at-top
  hints = cfg["hints"].split(",")
  unknown = sorted(set(hints) - set(HINTS))
  if unknown:
    return {"skipped": f"the torch peer has no {','.join(unknown)}"}
  if cfg["jac_target"] != "label" and "jac" in hints:
    return {"skipped": "the torch peer takes Jacobians at the label only"}
  if cfg.get("jac_estimator", "backprop") != "backprop" and "jac" in hints:
    return {"skipped": "the torch peer takes Jacobians by backprop only"}
  precision = AUTOCAST.get(cfg.get("mixed_precision", "float32"), "unknown")
  if precision == "unknown":
    return {"skipped": f"the torch peer has no {cfg['mixed_precision']}"}
  where = device()
  torch.manual_seed(0)
  stats = dict(mean=[0.5] * cfg["channels"], std=[0.25] * cfg["channels"])
  shape = (cfg["image_size"], cfg["channels"], cfg["num_classes"])
  teacher = VGG(LAYOUTS[cfg["teacher_model"]], *shape, **stats)
  student = VGG(LAYOUTS[cfg["model"]], *shape, width=cfg["width"], **stats)
  teacher, student = teacher.to(where), student.to(where)
  for p in teacher.parameters():
    p.requires_grad_(False)
  opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
  # float16: dynamic loss scaling, as Keras' LossScaleOptimizer does for tfjac.
  scaler = torch.amp.GradScaler(where, enabled=precision == torch.float16)
  rng = np.random.default_rng(0)
  x = torch.from_numpy(rng.random((cfg["batch_size"], cfg["channels"], cfg["image_size"],
                                   cfg["image_size"]), np.float32)).to(where)
  y = torch.from_numpy(rng.integers(0, cfg["num_classes"], cfg["batch_size"])).to(where)
  weights = {h: 1.0 for h in hints}

  def step():
    opt.zero_grad(set_to_none=True)
    terms = per_example_terms(student, teacher, x, y, hints, training=True,
                              precision=precision)
    loss = sum(weights[h] * terms[h] for h in hints).mean()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return float(loss.detach())  # to the host: synchronised

  for _ in range(cfg["warmup"]):
    step()
  times = []
  for _ in range(cfg["steps"]):
    start = time.perf_counter()
    loss = step()
    times.append(time.perf_counter() - start)
  if not np.isfinite(loss):
    raise RuntimeError(f"torch peer: non-finite loss {loss}")
  ms = 1000 * float(np.median(times))
  return {"ms_per_step": ms, "images_per_s": cfg["batch_size"] / ms * 1000,
          "ms_per_step_all": [1000 * t for t in times], "torch": torch.__version__,
          "threads": torch.get_num_threads(), "device": where,
          "precision": cfg.get("mixed_precision", "float32")}
