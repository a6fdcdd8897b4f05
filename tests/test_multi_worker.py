"""--strategy=multi_worker: two worker processes on localhost, each with its TF_CONFIG, run the
same tiny distillation command and end with the same student weights; only the chief writes
--workdir, the other worker writes under <workdir>/workers/worker_1."""
import json
import pathlib
import socket
import subprocess

import h5py
import numpy as np

from tests import helpers

FLAGS = ["--strategy=multi_worker", "--mode=distill", "--hints=act,jac,ce", "--model=vgg4",
         "--width=0.25", "--teacher_model=vgg4", "--teacher_width=0.25", "--epochs=1",
         "--teacher_epochs=1", "--steps_per_epoch=2", "--batch_size=16",
         "--samples_per_class=5"]


def _free_ports(n):
  sockets = [socket.socket() for _ in range(n)]
  for s in sockets:
    s.bind(("localhost", 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


def _weights(path):
  out = {}
  with h5py.File(path, "r") as f:
    f.visititems(lambda name, obj: out.__setitem__(name, obj[()])
                 if isinstance(obj, h5py.Dataset) else None)
  return out


def test_two_workers_end_with_the_same_weights(tmp_path):
  workdir = tmp_path / "run"
  addresses = [f"localhost:{p}" for p in _free_ports(2)]
  procs = []
  for index in range(2):
    env = helpers.cli_env(CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2",
                          TF_CONFIG=json.dumps({"cluster": {"worker": addresses},
                                                "task": {"type": "worker", "index": index}}))
    log = open(tmp_path / f"worker_{index}.log", "w")
    procs.append((helpers.start_cli(*FLAGS, f"--workdir={workdir}", env=env, stdout=log,
                                    stderr=subprocess.STDOUT), log))
  try:
    for proc, _ in procs:
      proc.wait(timeout=300)  # ~30 s on a quiet 2-core machine; generous under load
  finally:
    for proc, log in procs:
      if proc.poll() is None:
        proc.kill()
      log.close()
  for index, (proc, _) in enumerate(procs):
    assert proc.returncode == 0, (tmp_path / f"worker_{index}.log").read_text()[-3000:]
  other = workdir / "workers" / "worker_1"
  for where in (workdir, other):
    results = json.loads((where / "results.json").read_text())
    assert results["replicas"] == 2
  assert not (workdir / "workers" / "worker_0").exists()  # worker 0 is the chief
  # Both fits of the student (choose_on_validation's default) end alike, so both workers keep
  # the same candidate.
  kept = [json.loads((w / "results.json").read_text())["student"]["choice"]["kept"]
          for w in (workdir, other)]
  assert kept[0] == kept[1]
  for candidate in ("given", "alternative"):
    last = pathlib.Path("candidates", candidate, "checkpoints", "student", "last.weights.h5")
    chief, worker = _weights(workdir / last), _weights(other / last)
    assert sorted(chief) == sorted(worker) and len(chief) > 4
    for name in chief:
      np.testing.assert_array_equal(chief[name], worker[name], err_msg=f"{candidate}: {name}")
