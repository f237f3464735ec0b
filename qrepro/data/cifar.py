"""CIFAR-10 / CIFAR-100 from whatever ``dataset.root`` points at:

* a torchvision folder (``cifar-10-batches-py`` / ``cifar-100-python`` inside it, or the folder itself);
  with ``download: true`` torchvision fetches it there where there is internet;
* an ImageFolder tree ``<root>/train/<class>/*.png|jpg`` and ``<root>/test/<class>/...``;
* a ``.tar.gz``/``.tgz``/``.tar`` of such a tree (e.g. the offline JPEG copy), decoded once and cached as a
  uint8 tensor file under ``$QREPRO_CACHE`` (default ``~/.cache/qrepro``).

The whole dataset is held on the device as uint8 and augmented there (random crop with 4-pixel zero padding,
horizontal flip).
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import datasets

from qrepro.data import DATASETS, DataBundle, tensor_bundle
from qrepro.errors import QreproError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

_TV_DIRS = {10: "cifar-10-batches-py", 100: "cifar-100-python"}
_IMG_EXT = (".png", ".jpg", ".jpeg", ".bmp")


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _stack(items: list[tuple[str, int, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    items.sort(key=lambda t: t[0])  # deterministic order independent of the archive's member order
    x = torch.from_numpy(np.stack([a for _, _, a in items])).permute(0, 3, 1, 2).contiguous()
    y = torch.tensor([c for _, c, _ in items], dtype=torch.long)
    return x, y


def _split_class(path: str) -> tuple[str, str] | None:
    """'.../train/cat/0001.jpg' -> ('train', 'cat')."""
    parts = Path(path).parts
    for i, p in enumerate(parts[:-2]):
        if p in ("train", "test", "val"):
            return ("test" if p == "val" else p), parts[i + 1]
    return None


def _from_members(members: list[tuple[str, bytes]], root: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    found = [sc for name, _ in members if (sc := _split_class(name))]
    per_split = {s: sorted({c for split, c in found if split == s}) for s in ("train", "test")}
    classes = sorted({c for _, c in found})
    if not classes:
        raise QreproError(
            f"dataset.root={root} has no train/<class>/ and test/<class>/ images; point dataset.root at a "
            "torchvision CIFAR folder, an ImageFolder tree or a .tar.gz of one"
        )
    if per_split["train"] and per_split["test"] and per_split["train"] != per_split["test"]:
        only = sorted(set(per_split["train"]) ^ set(per_split["test"]))
        raise QreproError(
            f"dataset.root={root}: train/ and test/ hold different class folders ({', '.join(only[:5])} in only one); "
            "both splits need the same classes"
        )
    cidx = {c: i for i, c in enumerate(classes)}
    out: dict[str, list] = {"train": [], "test": []}
    for name, data in members:
        sc = _split_class(name)
        if sc is None:
            continue
        try:
            out[sc[0]].append((name, cidx[sc[1]], _decode(data)))
        except Exception as e:  # noqa: BLE001 - any decoder error is a malformed dataset
            raise QreproError(
                f"dataset.root={root}: cannot decode image {name} ({e}); the dataset is corrupt"
            ) from None
    if not out["train"] or not out["test"]:
        raise QreproError(f"dataset.root={root} needs both train/ and test/ splits")
    return {k: _stack(v) for k, v in out.items()}


def _load_archive(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:16]
    cached = Path(os.environ.get("QREPRO_CACHE", Path.home() / ".cache" / "qrepro")) / f"{path.name}.{key}.pt"
    if cached.exists():
        try:
            return torch.load(cached, weights_only=True)
        except Exception:  # noqa: BLE001 - a broken cache is rebuilt
            cached.unlink(missing_ok=True)
    print(f"decoding {path} once (cached at {cached}) ...", flush=True)
    try:
        with tarfile.open(path) as tar:  # a regular file member always has a file object
            members = [
                (m.name, tar.extractfile(m).read()) for m in tar if m.isfile() and m.name.lower().endswith(_IMG_EXT)
            ]
    except (tarfile.TarError, OSError, EOFError) as e:
        why = "not a tar, tar.gz or tar.bz2 archive" if isinstance(e, tarfile.ReadError) else str(e).splitlines()[0]
        raise QreproError(
            f"dataset.root={path} is not a readable tar archive ({why}); re-download or fix the path"
        ) from None
    data = _from_members(members, str(path))
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    torch.save(data, tmp)
    os.replace(tmp, cached)
    return data


def _load_imagefolder(root: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    dirs = [root / split for split in ("train", "test", "val") if (root / split).is_dir()]
    members = [
        (str(p.relative_to(root)), p.read_bytes())
        for d in dirs
        for p in sorted(d.rglob("*"))
        if p.suffix.lower() in _IMG_EXT
    ]
    return _from_members(members, str(root))


def _load_torchvision(root: Path, classes: int, download: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    cls = datasets.CIFAR10 if classes == 10 else datasets.CIFAR100
    base = root.parent if root.name == _TV_DIRS[classes] else root
    out = {}
    for split, train in (("train", True), ("test", False)):
        try:
            ds = cls(str(base), train=train, download=download)
        except Exception as e:  # noqa: BLE001 - torchvision raises RuntimeError/OSError/pickle errors
            raise QreproError(f"dataset.root={root}: cannot load CIFAR-{classes} ({e}); check the path") from None
        out[split] = (torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets))
    return out


def load_cifar_tensors(root: str | None, classes: int = 10, download: bool = False):
    """{'train': (x uint8 NCHW, y), 'test': (...)} from a torchvision folder, ImageFolder tree or archive."""
    if not root:
        raise QreproError(
            f"dataset.root is not set for cifar{classes}; pass dataset.root=<torchvision folder, ImageFolder tree "
            "or .tar.gz>"
        )
    p = Path(os.path.expanduser(str(root)))
    if p.is_file():
        return _load_archive(p)
    if p.is_dir():
        if (p / _TV_DIRS[classes]).is_dir() or p.name == _TV_DIRS[classes]:
            return _load_torchvision(p, classes, download=False)
        if (p / "train").is_dir():
            return _load_imagefolder(p)
    if download:
        p.mkdir(parents=True, exist_ok=True)
        return _load_torchvision(p, classes, download=True)
    raise QreproError(
        f"dataset.root={root} does not exist or holds no CIFAR-{classes} data; point it at a torchvision folder, "
        "an ImageFolder tree or a .tar.gz of one (or add dataset.download=true where there is internet)"
    )


# the loader options (overridden by the dataset config; tensor_bundle takes the others)
DEFAULTS = dict(batch_size=128, test_batch_size=1000, mean=CIFAR10_MEAN, std=CIFAR10_STD, crop_padding=4, flip=True)


def _build(classes: int):
    def build(*, root: str | None = None, download: bool = False, subset: int | None = None, **options) -> DataBundle:
        data = load_cifar_tensors(root, classes, download)
        (xtr, ytr), (xte, yte) = data["train"], data["test"]
        found = int(torch.cat([ytr, yte]).max()) + 1
        present = len(torch.unique(ytr))
        if found != classes or present != classes:
            other = {10: "cifar10", 100: "cifar100"}.get(found)
            raise QreproError(
                f"dataset.root={root} has {found} classes ({present} with training images) but dataset=cifar{classes} "
                f"expects {classes}; "
                + (f"use dataset={other}" if other else "point dataset.root at CIFAR-" + str(classes))
            )
        if subset:  # a deterministic random subset (all classes) for smoke tests
            g = torch.Generator().manual_seed(0)
            itr = torch.randperm(len(ytr), generator=g)[:subset]
            ite = torch.randperm(len(yte), generator=g)[:subset]
            xtr, ytr, xte, yte = xtr[itr], ytr[itr], xte[ite], yte[ite]
        return tensor_bundle((xtr, ytr), (xte, yte), classes, **{**DEFAULTS, **options})

    return build


DATASETS.register("cifar10")(_build(10))
DATASETS.register("cifar100")(_build(100))
