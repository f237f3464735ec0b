"""Datasets: small ones held on the device as one uint8 tensor (crop + flip on the device), ImageNet through
torchvision's ImageFolder and a DataLoader.

``build_data(name, root, batch_size, device, ...) -> DataBundle``; every loader yields ``(x, y)`` on ``device``
with ``x`` float32, normalised by ``mean``/``std`` or left as raw 0..255 pixels (``raw255``, as SAT uses).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import torch

from qrepro.errors import QreproError
from qrepro.registry import Registry, import_submodules

DATASETS = Registry("dataset")


@dataclass
class Normalizer:
    """uint8 NCHW -> float32, either raw 0..255 or (x/255 - mean)/std."""

    mean: Sequence[float] | None
    std: Sequence[float] | None
    raw255: bool = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.raw255:
            return x
        x = x / 255.0
        if self.mean is not None and self.std is not None:
            m = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
            s = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
            x = (x - m) / s
        return x


@dataclass(eq=False, repr=False)
class TensorLoader:
    """Batches from uint8 images held on the device; random crop (zero padding) + flip on the device.

    Deterministic given ``seed`` and the epoch number (``set_epoch``), so a resumed run sees the same order.
    With ``world_size > 1`` (DDP) rank ``r`` takes positions ``r::world_size`` of the epoch's permutation; the
    training shards are padded to equal length, test shards are not (each test image is evaluated exactly once).
    Augmentation draws are made for the whole global batch and sliced the same way, so when the training set size
    is divisible by ``world_size`` the ranks together see exactly the single-process batches.
    """

    images: torch.Tensor
    labels: torch.Tensor
    batch_size: int
    normalize: Normalizer
    _: KW_ONLY
    train: bool
    crop_padding: int = 0  # training only, as the flip
    flip: bool = False
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    epoch: int = field(default=0, init=False)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        n, ws = self.labels.shape[0], self.world_size
        if not self.train:
            idx = torch.arange(n)
        else:
            idx = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch))
            if ws > 1:  # padded so every rank takes the same number of steps (test shards: metrics are summed)
                idx = torch.cat([idx, idx[: -(-n // ws) * ws - n]])
        return idx[self.rank :: ws].to(self.images.device)

    def __len__(self) -> int:
        n = self.labels.shape[0]
        if self.world_size > 1:
            n = -(-n // self.world_size) if self.train else len(range(self.rank, n, self.world_size))
        return -(-n // self.batch_size)

    def _augment(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        b, _, h, w = x.shape
        dev = x.device
        ws, r = self.world_size, self.rank  # draw for the global batch, keep this rank's positions r::ws
        if self.crop_padding:
            p = self.crop_padding
            xp = torch.nn.functional.pad(x, (p, p, p, p))
            dx = torch.randint(0, 2 * p + 1, (b * ws,), generator=g)[r::ws].to(dev)
            dy = torch.randint(0, 2 * p + 1, (b * ws,), generator=g)[r::ws].to(dev)
            rows = (dy.view(b, 1) + torch.arange(h, device=dev).view(1, h)).view(b, 1, h, 1)
            cols = (dx.view(b, 1) + torch.arange(w, device=dev).view(1, w)).view(b, 1, 1, w)
            bi = torch.arange(b, device=dev).view(b, 1, 1, 1)
            ci = torch.arange(x.shape[1], device=dev).view(1, -1, 1, 1)
            x = xp[bi, ci, rows, cols]
        if self.flip:
            m = (torch.rand(b * ws, generator=g)[r::ws] < 0.5).to(dev).view(b, 1, 1, 1)
            x = torch.where(m, x.flip(3), x)
        return x

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self._indices()
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch + 1)
        for k in range(len(self)):
            j = idx[k * self.batch_size : (k + 1) * self.batch_size]
            x = self.images[j]
            if self.train:
                x = self._augment(x, g)
            yield self.normalize(x), self.labels[j]


@dataclass
class DataBundle:
    train: Any
    test: Any
    num_classes: int
    in_channels: int
    image_size: int
    num_train: int
    num_test: int


def tensor_bundle(
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    classes: int,
    *,
    batch_size: int,
    test_batch_size: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    crop_padding: int,
    flip: bool,
    raw255: bool = False,
    device: str | torch.device = "cpu",
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    **_: object,
) -> DataBundle:
    """A DataBundle of device-held uint8 tensors (train augmented on the device, test sharded without padding);
    the dataset config's other keys are ignored."""
    dev, norm = torch.device(device), Normalizer(mean, std, raw255)
    (xtr, ytr), (xte, yte) = train, test
    shard = {"rank": rank, "world_size": world_size}
    aug = {"crop_padding": crop_padding, "flip": flip, "seed": seed}
    tr = TensorLoader(xtr.to(dev), ytr.to(dev), batch_size, norm, train=True, **aug, **shard)
    te = TensorLoader(xte.to(dev), yte.to(dev), test_batch_size, norm, train=False, **shard)
    return DataBundle(tr, te, classes, xtr.shape[1], xtr.shape[-1], len(ytr), len(yte))


def build_data(name: str, **kwargs: Any) -> DataBundle:
    """Build the registered dataset ``name`` (see configs/dataset/<name>.yaml for the keys)."""
    import_submodules(__name__, __path__)
    factory = DATASETS.get(name)
    try:
        return factory(**kwargs)
    except TypeError as e:
        raise QreproError(f"bad options for dataset={name}: {e}") from None
