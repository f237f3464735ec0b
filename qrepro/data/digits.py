"""scikit-learn's bundled handwritten digits (1,797 8x8 images, no download), as 3x32x32 uint8 images."""

from __future__ import annotations

import torch

from qrepro.data import DATASETS, DataBundle, tensor_bundle


def load_digits_tensors(image_size: int = 32, test_fraction: float = 0.2):
    """(x_train, y_train, x_test, y_test) as uint8 NCHW tensors; a fixed, stratified-by-order split."""
    from sklearn.datasets import load_digits  # imported here: scikit-learn is slow to import, only digits needs it

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)  # values 0..16
    y = torch.tensor(d.target, dtype=torch.long)
    x = torch.nn.functional.interpolate(x.unsqueeze(1), size=(image_size, image_size), mode="bilinear")
    x = (x.clamp(0, 16) * (255.0 / 16.0)).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    g = torch.Generator().manual_seed(1234)  # the split never depends on the run's seed
    perm = torch.randperm(len(y), generator=g)
    n_test = int(round(len(y) * test_fraction))
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


# the loader options (overridden by the dataset config; tensor_bundle takes the others)
DEFAULTS = dict(batch_size=64, test_batch_size=512, mean=(0.5,) * 3, std=(0.5,) * 3, crop_padding=2, flip=False)


@DATASETS.register("digits")
def build_digits(*, image_size: int = 32, **options: object) -> DataBundle:
    xtr, ytr, xte, yte = load_digits_tensors(image_size)
    return tensor_bundle((xtr, ytr), (xte, yte), 10, **{**DEFAULTS, **options})
