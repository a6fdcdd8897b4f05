"""tfjac: knowledge transfer with Jacobian matching, in TensorFlow / Keras 3."""
import setuptools

setuptools.setup(
    name="tfjac",
    version="0.1.0",
    description="Knowledge transfer with Jacobian matching (Srinivas & Fleuret, ICML 2018)",
    packages=setuptools.find_packages(include=["tfjac", "tfjac.*"]),
    package_data={"tfjac": ["data/embedded/*.npz", "data/embedded/*.md"]},
    python_requires=">=3.10",
    # TensorFlow itself comes from requirements.txt: tensorflow-cpu or tensorflow[and-cuda].
    install_requires=["keras>=3.12,<4", "tensorflow-datasets>=4.9.10", "tensorboard>=2.20",
                      "absl-py>=2.1", "numpy>=1.26"],
    # Benchmark-only: tools/benchmark.py --peer=torch (the CPU wheel: pip install torch==2.13.0
    # --index-url https://download.pytorch.org/whl/cpu). Never needed by the package or its tests.
    # KerasHub teachers (--teacher=kerashub:DIR): keras-hub's own requirements pull in
    # tensorflow-text and with it a second TensorFlow wheel (tensorflow next to tensorflow-cpu),
    # so keras-hub itself is installed with --no-deps and this extra brings what its import
    # needs (README, Your own networks).
    extras_require={"bench": ["torch"], "hub": ["kagglehub", "tokenizers"]},
    entry_points={"console_scripts": ["tfjac=tfjac.run:entry_point"]},
)
