"""Post-training quantization (``python -m qrepro.ptq``): see core.py for the algorithms, aciq.py for the
analytic clipping, quantizers.py for the fake-quantizers and levels.py for the non-uniform level sets."""

from qrepro.ptq.core import PTQ_ALGORITHMS, PTQConfig, fold_weight_transforms, quantize_model

__all__ = ["PTQ_ALGORITHMS", "PTQConfig", "fold_weight_transforms", "quantize_model"]
