"""normbench: an experiment runner for normalization studies."""

__version__ = "0.1.0"
