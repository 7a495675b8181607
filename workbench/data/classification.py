"""Datasets from local files only (nothing downloads at run time).

Small datasets (Fashion-MNIST, CIFAR, synthetic) are held as uint8 tensors and can live on the training device,
with augmentation done there in batches (:class:`TensorData`): on a GPU this removes the data loader entirely.
Larger ones (any ImageFolder tree, e.g. ImageNet) go through a DataLoader with timm's transforms (:class:`FolderData`).
Both iterate an epoch from a permutation seeded by (seed, epoch), so a resumed run sees exactly the same batches.
"""
from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")
FMNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
DATASETS = ("fashion-mnist", "cifar10", "cifar100", "imagefolder", "synthetic")


class DatasetNotFound(FileNotFoundError):
    """A dataset's files are not where we looked; the message says where we looked and how to get them."""


def _read_idx(path: Path) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
        zero, dtype, ndim = struct.unpack(">HBB", data[:4])
        shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
        if zero != 0 or dtype != 0x08:
            raise ValueError("not an unsigned-byte idx file")
        return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
    except (OSError, ValueError, struct.error, EOFError) as err:
        raise DatasetNotFound(f"{path} is not a readable idx.gz file ({err}); reinstall the dataset "
                              "(apt-get install --reinstall dataset-fashion-mnist)") from err


def find_fashion_mnist(root: str | os.PathLike | None = None) -> Path:
    """The first of: ``root``, ``$WORKBENCH_DATA`` (or its ``fashion-mnist/``), Debian's folder, holding all four files."""
    candidates = []
    if root is not None:
        candidates += [Path(root), Path(root) / "fashion-mnist"]
    if os.environ.get("WORKBENCH_DATA"):
        env = Path(os.environ["WORKBENCH_DATA"])
        candidates += [env, env / "fashion-mnist"]
    candidates.append(DEBIAN_FMNIST)
    needed = [name for pair in FMNIST_FILES.values() for name in pair]
    for folder in candidates:
        if all((folder / name).is_file() for name in needed):
            return folder
    searched = ", ".join(str(c) for c in candidates)
    raise DatasetNotFound(
        f"Fashion-MNIST not found (searched: {searched}). Install it with "
        "`apt-get update && apt-get install -y dataset-fashion-mnist`, or put the four idx .gz files "
        f"({', '.join(needed)}) in a folder and pass it as the data root or set WORKBENCH_DATA.")


def load_fashion_mnist(split: str = "train", root=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 1, 28, 28), labels int64 (N,))."""
    if split not in FMNIST_FILES:
        raise ValueError(f"split={split!r} is invalid: use 'train' or 'test'")
    folder = find_fashion_mnist(root)
    images, labels = (_read_idx(folder / name) for name in FMNIST_FILES[split])
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def load_cifar(name: str, split: str, root) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10/100 from a torchvision-format folder (``cifar-10-batches-py`` / ``cifar-100-python``)."""
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    root = root or os.environ.get("WORKBENCH_DATA")
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    if root is None or not (Path(root) / folder).is_dir():
        raise DatasetNotFound(f"{name} not found: expected a folder {folder}/ (torchvision's format) under "
                              f"{root or 'the data root'}; pass --data-root or set WORKBENCH_DATA. Nothing is downloaded.")
    ds = cls(str(root), train=split == "train", download=False)
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(ds.targets, dtype=torch.int64)


def synthetic(n: int = 512, num_classes: int = 10, img_size: int = 28, in_chans: int = 1, seed: int = 0,
              noise: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable toy images: a random template per class (the same for every split) plus noise, as uint8;
    ``seed`` draws the labels and the noise."""
    coarse = torch.rand(num_classes, in_chans, 7, 7, generator=torch.Generator().manual_seed(1234))
    templates = F.interpolate(coarse, size=(img_size, img_size), mode="nearest")  # blocky: patch-scale signal
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    images = templates[labels] + noise * torch.randn(n, in_chans, img_size, img_size, generator=g)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8), labels


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def epoch_batches(n: int, batch_size: int, *, seed: int = 0, epoch: int = 0, shuffle: bool = True, start: int = 0,
                  rank: int = 0, world: int = 1, drop_last: bool = False, augment: bool = False):
    """Yield (indices, augmentation seed or None) of one epoch's batches; ``start`` skips batches already done, the
    augmentation draws of skipped batches included, so a resumed epoch is exact; under DDP each rank takes an
    equal, disjoint, interleaved share (truncated with ``drop_last``, so every rank makes the same steps)."""
    order = epoch_permutation(n, seed, epoch) if shuffle else torch.arange(n)
    if world > 1:
        order = order[rank::world]
        if drop_last:
            order = order[:n // world]
    n_batches = len(order) // batch_size if drop_last else -(-len(order) // batch_size)
    g = torch.Generator().manual_seed(seed * 7919 + epoch * 31 + rank)
    for i in range(n_batches):
        aug_seed = int(torch.randint(0, 2**62, (1,), generator=g)) if augment else None
        if i >= start:
            yield order[i * batch_size:(i + 1) * batch_size], aug_seed


def normalise(images: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    """uint8 images -> floats standardised per channel."""
    x = images.float().div_(255)
    return (x - torch.tensor(mean, device=x.device).view(1, -1, 1, 1)) / torch.tensor(std, device=x.device).view(
        1, -1, 1, 1)


@dataclass
class TensorData:
    """A whole dataset as uint8 tensors (optionally on the training device), normalised and augmented in batches."""

    images: torch.Tensor
    labels: torch.Tensor
    mean: tuple
    std: tuple
    num_classes: int
    augment: bool = False
    pad: int = 2
    flip: bool = True

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device) -> "TensorData":
        self.images, self.labels = self.images.to(device), self.labels.to(device)
        return self

    def subset(self, n: int | None, seed: int = 0) -> "TensorData":
        """A fixed random subset (the same for every run with this seed)."""
        if n is None or n >= len(self):
            return self
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n].to(self.labels.device)
        return self._take(idx)

    def only_classes(self, classes) -> "TensorData":
        """The images whose label is in ``classes``, labels unchanged (the head keeps every output)."""
        return self._take(torch.isin(self.labels, torch.as_tensor(list(classes), device=self.labels.device)))

    def _take(self, idx: torch.Tensor) -> "TensorData":
        return TensorData(self.images[idx], self.labels[idx], self.mean, self.std, self.num_classes, self.augment,
                          self.pad, self.flip)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return normalise(images, self.mean, self.std)

    def _augment(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Random crop after zero padding (in normalised space: pad with the normalised 0) and horizontal flip."""
        b, _, h, w = x.shape
        p = self.pad
        if p:
            fill = self.normalise(torch.zeros(1, x.shape[1], 1, 1, dtype=torch.uint8, device=x.device))
            padded = F.pad(x - fill, (p, p, p, p)) + fill
            dy = torch.randint(0, 2 * p + 1, (b,), generator=g).to(x.device)
            dx = torch.randint(0, 2 * p + 1, (b,), generator=g).to(x.device)
            x = _crop(padded, dy, dx, h, w)
        if self.flip:
            flip = (torch.rand(b, generator=g) < 0.5).to(x.device)
            x = torch.where(flip.view(b, 1, 1, 1), x.flip(-1), x)
        return x

    def batches(self, batch_size: int, *, seed: int = 0, epoch: int = 0, shuffle: bool = True, start: int = 0,
                rank: int = 0, world: int = 1, drop_last: bool = False):
        """Yield (images float, labels) for one epoch (see :func:`epoch_batches`: exact resume, DDP shares)."""
        for idx, aug_seed in epoch_batches(len(self), batch_size, seed=seed, epoch=epoch, shuffle=shuffle,
                                           start=start, rank=rank, world=world, drop_last=drop_last,
                                           augment=self.augment):
            idx = idx.to(self.labels.device)
            x = self.normalise(self.images[idx])
            if self.augment:
                x = self._augment(x, torch.Generator().manual_seed(aug_seed))
            yield x, self.labels[idx]

    def num_batches(self, batch_size: int, world: int = 1, drop_last: bool = False) -> int:
        return _num_batches(len(self), batch_size, world, drop_last)


def _num_batches(n: int, batch_size: int, world: int, drop_last: bool) -> int:
    """Batches per rank: training shares are truncated to n // world, evaluation shares are ceil(n / world)."""
    share = n // world if drop_last else -(-n // world)
    return share // batch_size if drop_last else -(-share // batch_size)


def _crop(padded: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Per-sample crop of size (h, w) at offsets (dy, dx) from a padded batch, as one gather."""
    b, c, hp, wp = padded.shape
    rows = dy.view(b, 1) + torch.arange(h, device=padded.device)  # (b, h)
    cols = dx.view(b, 1) + torch.arange(w, device=padded.device)  # (b, w)
    flat = (rows.view(b, h, 1) * wp + cols.view(b, 1, w)).view(b, 1, h * w).expand(b, c, h * w)
    return padded.reshape(b, c, hp * wp).gather(2, flat).view(b, c, h, w)


class FolderData:
    """An ImageFolder tree (``root/<split>/<class>/*.jpg``) read with timm's transforms for the model."""

    def __init__(self, root, split: str, model, train: bool, num_workers: int = 4):
        import torchvision
        from timm.data import create_transform, resolve_data_config

        folder = Path(root or "") / split
        if root is None or not folder.is_dir():
            raise DatasetNotFound(f"ImageFolder split not found: {folder} (expected <root>/{split}/<class>/<image>); "
                                  "pass --data-root")
        config = resolve_data_config(model=model)
        self.dataset = torchvision.datasets.ImageFolder(str(folder), transform=create_transform(**config,
                                                                                               is_training=train))
        self.labels = torch.tensor(self.dataset.targets)
        self.num_classes = len(self.dataset.classes)
        self.num_workers = num_workers

    def __len__(self) -> int:
        return len(self.dataset)

    def subset(self, n, seed: int = 0):
        if n is not None and n < len(self):
            keep = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
            self.dataset.samples = [self.dataset.samples[i] for i in keep]
            self.dataset.targets = [s[1] for s in self.dataset.samples]
            self.labels = torch.tensor(self.dataset.targets)
        return self

    def to(self, device):
        return self

    def num_batches(self, batch_size: int, world: int = 1, drop_last: bool = False) -> int:
        return _num_batches(len(self), batch_size, world, drop_last)

    def batches(self, batch_size: int, *, seed: int = 0, epoch: int = 0, shuffle: bool = True, start: int = 0,
                rank: int = 0, world: int = 1, drop_last: bool = False):
        order = epoch_permutation(len(self), seed, epoch) if shuffle else torch.arange(len(self))
        if world > 1:
            n = len(order)
            order = order[rank::world]
            if drop_last:
                order = order[:n // world]
        order = order[start * batch_size:]
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=batch_size, sampler=order.tolist(),
                                             num_workers=self.num_workers, drop_last=drop_last,
                                             pin_memory=torch.cuda.is_available())
        yield from loader


VAL_SEED = 2410_15732  # the validation split is the same for every run seed, so configs and seeds share it


def build_splits(name: str, *, val_size: int = 0, root=None, model=None, train_subset: int | None = None,
                 test_subset: int | None = None, augment: bool = True, seed: int = 0, num_workers: int = 4,
                 classes=None):
    """(train, validation, test): ``val_size`` images carved out of the training set by a fixed draw (independent
    of ``seed``), never augmented, never trained on; ``train_subset`` then samples what is left.  With
    ``val_size=0`` the validation split is None.  Choose layers, thresholds and hyperparameters on it, not on test.
    ``classes`` (a list of labels) keeps only those classes in every split, after the validation draw, so that a
    model pretrained on part of the label set never sees the validation images of the full task."""
    if classes is not None:
        splits = build_splits(name, val_size=val_size, root=root, model=model, train_subset=None,
                              test_subset=test_subset, augment=augment, seed=seed, num_workers=num_workers)
        if not all(isinstance(d, TensorData) for d in splits if d is not None):
            raise ValueError("train_classes keeps classes of in-memory datasets only (fashion-mnist, cifar, "
                             "synthetic); leave it unset for an imagefolder dataset")
        bad = sorted(set(classes) - set(range(splits[0].num_classes)))
        if bad:
            raise ValueError(f"train_classes {bad} are not labels of {name} (0 to {splits[0].num_classes - 1})")
        train, val, test = (None if d is None else d.only_classes(classes) for d in splits)
        return train.subset(train_subset, seed), val, test
    train, test = build_datasets(name, root=root, model=model, augment=augment, test_subset=test_subset,
                                 seed=seed, num_workers=num_workers)
    if not val_size:
        return train.subset(train_subset, seed), None, test
    if not isinstance(train, TensorData):
        raise ValueError(f"val_size={val_size}: a validation split is carved only from in-memory datasets "
                         f"(fashion-mnist, cifar, synthetic); an imagefolder dataset uses its own val/ folder")
    if not 0 < val_size < len(train):
        raise ValueError(f"val_size={val_size} must be between 1 and {len(train) - 1} (the training set has "
                         f"{len(train)} images)")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(VAL_SEED)).to(train.labels.device)
    pick = lambda idx, aug: TensorData(train.images[idx], train.labels[idx], train.mean, train.std,  # noqa: E731
                                       train.num_classes, aug, train.pad, train.flip)
    val, rest = pick(order[:val_size], False), pick(order[val_size:], train.augment)
    return rest.subset(train_subset, seed), val, test


def build_datasets(name: str, *, root=None, model=None, train_subset: int | None = None,
                   test_subset: int | None = None, augment: bool = True, seed: int = 0, num_workers: int = 4):
    """(train, test) for a dataset name; mean/std come from the model's pretrained config when there is one."""
    if name not in DATASETS:
        raise ValueError(f"dataset={name!r} is not known: use one of {DATASETS}")
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    if name == "imagefolder":
        return (FolderData(root, "train", model, True, num_workers).subset(train_subset, seed),
                FolderData(root, "val", model, False, num_workers).subset(test_subset, seed))
    if name == "fashion-mnist":
        train, test = load_fashion_mnist("train", root), load_fashion_mnist("test", root)
        classes, stats = 10, ((0.2860,), (0.3530,))
    elif name in ("cifar10", "cifar100"):
        train, test = load_cifar(name, "train", root), load_cifar(name, "test", root)
        classes, stats = (10 if name == "cifar10" else 100), ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    else:
        in_chans, size = (cfg.get("input_size") or (1, 28, 28))[0], (cfg.get("input_size") or (1, 28, 28))[-1]
        classes = cfg.get("num_classes") or 10
        train = synthetic(train_subset or 512, classes, size, in_chans, seed=1)
        test = synthetic(test_subset or 256, classes, size, in_chans, seed=2)
        stats = ((0.5,) * in_chans, (0.25,) * in_chans)
    mean, std = stats
    if name != "synthetic" and cfg.get("mean") and len(cfg["mean"]) == train[0].shape[1]:
        mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    pad = max(1, train[0].shape[-1] // 14)
    augment = augment and name != "synthetic"  # random templates are not flip/shift invariant
    train_ds = TensorData(*train, mean, std, classes, augment=augment, pad=pad).subset(train_subset, seed)
    test_ds = TensorData(*test, mean, std, classes, augment=False).subset(test_subset, seed)
    return train_ds, test_ds
