"""Datasets: digits shape, device-side augmentation, CIFAR from ImageFolder trees and archives, bad roots."""

import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from qrepro.data import Normalizer, TensorLoader, build_data
from qrepro.errors import QreproError


def test_digits_shapes_and_split():
    b = build_data("digits", batch_size=32)
    assert (b.num_train, b.num_test, b.num_classes) == (1438, 359, 10)
    x, y = next(iter(b.train))
    assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    raw = build_data("digits", batch_size=32, raw255=True)
    xr, _ = next(iter(raw.test))
    assert xr.min() >= 0 and xr.max() <= 255 and xr.max() > 100


def test_tensor_loader_deterministic_and_augments():
    imgs = torch.arange(4 * 3 * 8 * 8, dtype=torch.int64).remainder(256).to(torch.uint8).view(4, 3, 8, 8)
    labels = torch.arange(4)

    def mk():
        return TensorLoader(
            imgs, labels, 2, Normalizer(None, None, raw255=True), train=True, crop_padding=2, flip=True, seed=3
        )

    a, b = mk(), mk()
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    a.set_epoch(1)
    xs = torch.cat([x for x, _ in a])
    assert xs.shape == (4, 3, 8, 8)
    # every crop pixel is either padding (0) or one of the image's own pixels
    assert set(xs.unique().tolist()) <= set(imgs.float().unique().tolist()) | {0.0}
    test = TensorLoader(imgs, labels, 3, Normalizer(None, None, raw255=True), train=False)
    assert torch.equal(torch.cat([x for x, _ in test]), imgs.float())


def test_sharding_covers_every_sample():
    imgs = torch.zeros(10, 3, 4, 4, dtype=torch.uint8)
    labels = torch.arange(10)
    seen = []
    for r in range(2):
        ld = TensorLoader(imgs, labels, 5, Normalizer(None, None, True), train=True, seed=0, rank=r, world_size=2)
        seen += torch.cat([y for _, y in ld]).tolist()
    assert sorted(seen) == list(range(10))


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _make_tree(root, n=3):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in CIFAR10_CLASSES:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / f"{i:04d}.png")


def test_cifar_from_imagefolder_and_tar(tmp_path, monkeypatch):
    monkeypatch.setenv("QREPRO_CACHE", str(tmp_path / "cache"))
    _make_tree(tmp_path / "tree")
    b = build_data("cifar10", root=str(tmp_path / "tree"), batch_size=4)
    assert (b.num_train, b.num_test) == (30, 30)
    arc = tmp_path / "c.tar.gz"
    with tarfile.open(arc, "w:gz") as t:
        t.add(tmp_path / "tree" / "train", arcname="train")
        t.add(tmp_path / "tree" / "test", arcname="test")
    b2 = build_data("cifar10", root=str(arc), batch_size=4)
    x1 = torch.cat([x for x, _ in b.test])
    x2 = torch.cat([x for x, _ in b2.test])
    assert torch.equal(x1, x2)  # PNG is lossless: both sources give the same tensors
    b3 = build_data("cifar10", root=str(arc), batch_size=4)  # from the cache
    assert torch.equal(torch.cat([x for x, _ in b3.test]), x1)


def test_malformed_roots(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(QreproError, match="dataset.root"):
        build_data("cifar10", root=str(tmp_path / "empty"))
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"nope")
    with pytest.raises(QreproError, match="dataset.root"):
        build_data("cifar10", root=str(bad))
    with pytest.raises(QreproError, match="dataset.root"):
        build_data("imagenet", root=str(tmp_path / "missing"))


@pytest.mark.skipif(
    not __import__("pathlib").Path("../shared/data/cifar10-jpeg.tar.gz").exists(),
    reason="offline CIFAR-10 copy not present",
)
def test_offline_cifar10_copy():
    b = build_data("cifar10", root="../shared/data/cifar10-jpeg.tar.gz", batch_size=256)
    assert (b.num_train, b.num_test, b.num_classes) == (50000, 10000, 10)


def test_imagenet_crops(tmp_path):
    """dataset.crop: random_resized (torchvision's, test short side + centre crop) and resize_square (LSQ: every
    image to resize x resize, random / centre image_size crop); a bad value or a resize below the crop is one line."""
    from qrepro.data.imagenet import crop_transforms

    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (60, 40), (10, 20, 30)).save(tmp_path / split / cls / "0.png")
    opts = dict(image_size=16, resize=24, crop="resize_square", workers=0, batch_size=2)
    data = build_data("imagenet", root=str(tmp_path), **opts)
    x, _ = next(iter(data.train))
    xt, _ = next(iter(data.test))
    assert x.shape[1:] == xt.shape[1:] == (3, 16, 16)
    train_t, test_t = crop_transforms("resize_square", 16, 24)
    assert [type(t).__name__ for t in train_t] == ["Resize", "RandomCrop", "RandomHorizontalFlip"]
    assert [type(t).__name__ for t in test_t] == ["Resize", "CenterCrop"] and tuple(test_t[0].size) == (24, 24)
    train_t, test_t = crop_transforms("random_resized", 16, 24)
    assert type(train_t[0]).__name__ == "RandomResizedCrop" and test_t[0].size in (24, [24])
    with pytest.raises(QreproError, match="dataset.crop"):
        crop_transforms("square", 16, 24)
    with pytest.raises(QreproError, match="dataset.resize=8"):
        crop_transforms("resize_square", 16, 8)
