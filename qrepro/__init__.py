"""qrepro: config-driven reproduction of quantization-aware training papers."""

__version__ = "0.1.0"
