"""Rebuilds tfjac/data/embedded/digits.npz from scikit-learn's copy of the UCI digits.

The embedded dataset is committed, so users never run this; it documents where the
bytes came from and lets anyone regenerate them (`pip install scikit-learn` first).
The test split is fixed here, once, so that it never moves with a run's seed.
"""
import os

import numpy as np
from sklearn.datasets import load_digits

TEST_FRACTION = 0.3
SPLIT_SEED = 20180301  # arbitrary, fixed forever: changing it changes every reported number


def main():
  digits = load_digits()
  images = digits.images.astype(np.uint8)[..., None]  # (1797, 8, 8, 1), values 0..16
  labels = digits.target.astype(np.uint8)
  rng = np.random.default_rng(SPLIT_SEED)
  split = np.zeros(len(labels), np.uint8)  # 0 = train, 1 = test
  for c in range(10):
    idx = rng.permutation(np.flatnonzero(labels == c))
    split[idx[:int(round(TEST_FRACTION * len(idx)))]] = 1
  out = os.path.join(os.path.dirname(__file__), "..", "tfjac", "data", "embedded", "digits.npz")
  np.savez_compressed(out, images=images, labels=labels, split=split,
                      max_value=np.array(16, np.uint8))
  print(f"wrote {out}: {len(labels)} images, {int((split == 0).sum())} train, "
        f"{int((split == 1).sum())} test")


if __name__ == "__main__":
  main()
