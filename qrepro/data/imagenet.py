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
        self.loader, self.device = loader, device
        self.raw255 = raw255
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
    t_train = transforms.Compose(
        [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(), _pil_to_uint8]
    )
    t_test = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(image_size), _pil_to_uint8])
    tr = datasets.ImageFolder(str(Path(root) / "train"), t_train)
    te = datasets.ImageFolder(str(Path(root) / "val"), t_test)
    sampler = None
    if world_size > 1:
        sampler = torch.utils.data.DistributedSampler(tr, world_size, rank, shuffle=True, seed=seed)
    g = torch.Generator().manual_seed(seed + 10007 * rank)  # per-rank worker seeds: independent augmentations
    dev = torch.device(device)
    pin = dev.type == "cuda"
    ltr = torch.utils.data.DataLoader(
        tr,
        batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin,
        drop_last=True,
        persistent_workers=workers > 0,
        generator=g,
    )
    test_shard = range(rank, len(te), world_size) if world_size > 1 else None  # unpadded: metrics are all-reduced
    lte = torch.utils.data.DataLoader(
        te, test_batch_size, shuffle=False, sampler=test_shard, num_workers=workers, pin_memory=pin
    )
    return DataBundle(
        DeviceLoader(ltr, dev, mean, std, raw255),
        DeviceLoader(lte, dev, mean, std, raw255),
        len(tr.classes),
        3,
        image_size,
        len(tr),
        len(te),
    )
