"""ImageNet (ILSVRC-2012) as an ImageFolder ``<root>/train`` and ``<root>/val`` read by a DataLoader."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torchvision import datasets, transforms

from qrepro.data import DATASETS, DataBundle
from qrepro.errors import QreproError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DeviceLoader:
    """Wraps a DataLoader of uint8 batches: moves them to the device and normalises there."""

    def __init__(self, loader, device: torch.device, mean, std, raw255: bool) -> None:
        self.loader, self.device, self.raw255 = loader, device, raw255
        self.mean = torch.tensor(mean).view(1, -1, 1, 1).to(device) * 255 if mean else None
        self.std = torch.tensor(std).view(1, -1, 1, 1).to(device) * 255 if std else None

    def set_epoch(self, epoch: int) -> None:
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.loader:
            x = x.to(self.device, non_blocking=True).float()
            if not self.raw255 and self.mean is not None:
                x = (x - self.mean) / self.std
            yield x, y.to(self.device, non_blocking=True)


class _SeededSampler(torch.utils.data.Sampler):
    """The training order of one rank, as ``(index, sample seed)`` pairs: a permutation set by (seed, epoch)
    (DistributedSampler's, one shard per rank) and each image's augmentation seed set by (seed, epoch, index).
    Both are drawn here, in the main process, so the batches do not depend on how many DataLoader processes
    decode them (``dataset.workers``) nor on what else drew from torch's random state."""

    def __init__(self, n: int, seed: int, rank: int, world_size: int) -> None:
        self.order = torch.utils.data.DistributedSampler(range(n), world_size, rank, shuffle=True, seed=seed)
        self.seed = int(seed)

    def set_epoch(self, epoch: int) -> None:
        self.order.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.order.epoch)
        seeds = torch.randint(0, 2**62, (len(self.order.dataset),), generator=g).tolist()
        return ((int(i), seeds[i]) for i in self.order)


class _Seeded(torch.utils.data.Dataset):
    """``dataset[index]`` with torch's random state set to the sample's seed (torchvision's random transforms
    draw from it), restored afterwards."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


def _pil_to_uint8(img) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def default_workers(cap: int = 8) -> int:
    """DataLoader processes when ``dataset.workers`` is null: the machine's CPU cores (those this process may
    use), at most ``cap``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(0, min(cap, cores))


CROPS = ("random_resized", "resize_square")


def crop_transforms(crop: str, image_size: int, resize: int) -> tuple[list, list]:
    """(training, test) transforms before the uint8 conversion. ``random_resized``: torchvision's random-resized
    crop (8-100 % of the area, aspect 3/4-4/3) to ``image_size`` and a horizontal flip half the time; test: the
    short side resized to ``resize``, centre ``image_size`` crop. ``resize_square``: every image resized to
    ``resize`` x ``resize``, then a random ``image_size`` crop and flip for training, the centre crop for testing
    (LSQ, Sec. 3: 256 x 256, 224 x 224)."""
    if crop == "random_resized":
        return (
            [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()],
            [transforms.Resize(resize), transforms.CenterCrop(image_size)],
        )
    if crop != "resize_square":
        raise QreproError(f"dataset.crop={crop!r} is not one of {', '.join(CROPS)}")
    if resize < image_size:
        raise QreproError(f"dataset.resize={resize} must be >= dataset.image_size={image_size} to crop from it")
    square = transforms.Resize((resize, resize))
    return (
        [square, transforms.RandomCrop(image_size), transforms.RandomHorizontalFlip()],
        [square, transforms.CenterCrop(image_size)],
    )


@DATASETS.register("imagenet")
def build_imagenet(
    *,
    root: str | None = None,
    batch_size: int = 256,
    test_batch_size: int = 256,
    device: str | torch.device = "cpu",
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
    raw255: bool = False,
    image_size: int = 224,
    resize: int = 256,
    crop: str = "random_resized",
    workers: int | None = None,
    num_classes: int = 1000,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    **_: object,
) -> DataBundle:
    if not root or not (Path(root) / "train").is_dir() or not (Path(root) / "val").is_dir():
        raise QreproError(
            f"dataset.root={root} is not an ImageNet folder; pass dataset.root=<dir with train/ and val/ ImageFolders>"
        )
    if workers is None:  # what the machine has, at most 8 decoding processes per rank
        workers = default_workers()
    train_t, test_t = crop_transforms(crop, image_size, resize)
    t_train, t_test = (transforms.Compose([*t, _pil_to_uint8]) for t in (train_t, test_t))
    tr = datasets.ImageFolder(str(Path(root) / "train"), t_train)
    te = datasets.ImageFolder(str(Path(root) / "val"), t_test)
    dev = torch.device(device)
    pin = dev.type == "cuda"
    ltr = torch.utils.data.DataLoader(
        _Seeded(tr),
        batch_size,
        sampler=_SeededSampler(len(tr), seed, rank, world_size),  # order and augmentation: (seed, epoch, image)
        num_workers=workers,
        pin_memory=pin,
        drop_last=True,
        persistent_workers=workers > 0,
    )
    test_shard = range(rank, len(te), world_size) if world_size > 1 else None  # unpadded: metrics are all-reduced
    lte = torch.utils.data.DataLoader(
        te, test_batch_size, shuffle=False, sampler=test_shard, num_workers=workers, pin_memory=pin
    )
    train, test = (DeviceLoader(ld, dev, mean, std, raw255) for ld in (ltr, lte))
    return DataBundle(train, test, len(tr.classes), 3, image_size, len(tr), len(te))
