"""runner: a fault-tolerant training runner for PyTorch."""

__version__ = "0.1.0"
