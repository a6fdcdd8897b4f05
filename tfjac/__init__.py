"""tfjac: knowledge transfer with Jacobian matching (Srinivas & Fleuret, ICML 2018) in Keras 3."""

__version__ = "0.1.0"
