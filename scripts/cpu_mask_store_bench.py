"""Why compiled fake quantization is slow on CPU: Inductor's C++ code stores boolean masks slowly.

    OMP_NUM_THREADS=2 python scripts/cpu_mask_store_bench.py

Times torch.compile'd element-wise functions on a ResNet-20-sized activation (128 x 16 x 32 x 32) under
``torch.no_grad()``: ReLU alone, and ReLU plus a second output that is a comparison mask stored as bool, uint8
or float32, or a plain float product. In training, AOTAutograd saves exactly such bool masks for the backward
pass of every ``where``/clamp in a fake-quantizer (and of ReLU itself), so this kernel pattern is what the
quantizers add to each layer. Prints the median of 20 calls per function (milliseconds).
"""

from __future__ import annotations

import statistics
import time

import torch

FUNCTIONS = {
    "relu": lambda x: torch.relu(x),
    "relu + bool mask": lambda x: (torch.relu(x), x <= 0),
    "relu + uint8 mask": lambda x: (torch.relu(x), (x <= 0).to(torch.uint8)),
    "relu + float32 mask": lambda x: (torch.relu(x), (x <= 0).float()),
    "relu + float32 product": lambda x: (torch.relu(x), x * 2),
}


def main() -> None:
    x = torch.randn(128, 16, 32, 32)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, input {tuple(x.shape)} float32")
    with torch.no_grad():
        for name, f in FUNCTIONS.items():
            g = torch.compile(f)
            for _ in range(3):
                g(x)
            times = []
            for _ in range(20):
                t = time.perf_counter()
                g(x)
                times.append(time.perf_counter() - t)
            print(f"{name:24s} {1e3 * statistics.median(times):7.2f} ms")


if __name__ == "__main__":
    main()
