"""The per-layer bit-width policies HAQ's authors published with their code (finetune.py and README of
mit-han-lab/haq), one entry per Conv2d/Linear layer in module order.

``kind``: ``linear`` entries are [w_bits, a_bits] for HAQ's linear quantizer (a_bits -1: the layer input is not
quantized); ``kmeans`` entries are weight bits for k-means weight sharing (weight-only). ``model`` is the model
of this zoo whose layer order the policy follows (the authors' model in parentheses).
"""

from __future__ import annotations

from typing import Any

# fmt: off
POLICIES: dict[str, dict[str, Any]] = {
    # finetune.py, --linear_quantization, 'mobilenetv2' in --arch; README: "preserve ratio 60%", the
    # "0.6x latency" checkpoint qmobilenetv2_0.6_71.23 (top-1 71.23 / top-5 90.00)
    "mobilenet_v2_latency_ratio060": {
        "kind": "linear",
        "model": "mobilenet_v2",  # (their qmobilenetv2: 52 convs + the classifier)
        "bits": [
            [8, -1], [7, 7], [5, 6], [4, 6], [5, 6], [5, 7], [5, 6], [7, 4], [4, 6], [4, 6], [7, 7], [5, 6],
            [4, 6], [7, 3], [5, 7], [4, 7], [7, 3], [5, 7], [4, 7], [7, 7], [4, 7], [4, 7], [6, 4], [6, 7],
            [4, 7], [7, 4], [6, 7], [5, 7], [7, 4], [6, 7], [5, 7], [7, 4], [6, 7], [6, 7], [6, 4], [5, 7],
            [6, 7], [6, 4], [5, 7], [6, 7], [7, 7], [4, 7], [7, 7], [7, 7], [4, 7], [7, 7], [7, 7], [4, 7],
            [7, 7], [7, 7], [4, 7], [7, 7], [8, 8],
        ],
    },
    # finetune.py, k-means branch, --arch resnet50 ("resnet50 ratio 10%": 10 % of the 32-bit model size);
    # run/run_kmeans_quantize_eval.sh evaluates the checkpoint resnet50_0.1_75.48 (top-1 75.48 / top-5 92.42)
    "resnet50_size_ratio010": {
        "kind": "kmeans",
        "model": "resnet50",  # (torchvision's resnet50: 53 convs + fc)
        "bits": [
            6, 6, 6, 6, 5, 5, 6, 5, 5, 6, 5, 5, 6, 5, 5, 5, 5, 5, 4, 5, 4, 4, 5, 4, 4, 4, 3, 4,
            4, 4, 3, 4, 4, 3, 4, 4, 3, 4, 4, 3, 4, 4, 3, 4, 3, 3, 2, 3, 2, 3, 3, 2, 3, 4,
        ],
    },
    # README.md, "Finetune Policy": the default k-means strategy "searched under preserve ratio = 0.1" as the
    # README prints it (it differs from finetune.py's list above in 27 of 54 layers)
    "resnet50_size_ratio010_readme": {
        "kind": "kmeans",
        "model": "resnet50",
        "bits": [
            6, 6, 5, 5, 5, 5, 4, 5, 5, 4, 5, 5, 5, 5, 5, 5, 3, 5, 4, 3, 5, 4, 3, 4, 4, 4, 2, 5,
            4, 3, 3, 5, 3, 2, 5, 3, 2, 4, 3, 2, 5, 3, 2, 5, 3, 4, 2, 5, 2, 3, 4, 2, 3, 4,
        ],
    },
}
# fmt: on


def policy_names() -> list[str]:
    return sorted(POLICIES)
