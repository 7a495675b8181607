import gzip
import os

import pytest
import torch

from workbench.data.classification import (DatasetNotFound, TensorData, build_datasets, find_fashion_mnist, load_fashion_mnist, synthetic)

HAVE_FMNIST = os.path.isfile("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz") or \
    bool(os.environ.get("WORKBENCH_DATA"))


def test_missing_fashion_mnist_names_places_and_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path / "nowhere"))
    monkeypatch.setattr("workbench.data.classification.DEBIAN_FMNIST", tmp_path / "debian")
    with pytest.raises(DatasetNotFound) as err:
        find_fashion_mnist(tmp_path / "explicit")
    message = str(err.value)
    assert "explicit" in message and "nowhere" in message and "apt-get install -y dataset-fashion-mnist" in message


def test_corrupt_idx_file_is_reported(tmp_path, monkeypatch):
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / name).write_bytes(b"not gzip")
    with pytest.raises(DatasetNotFound, match="not a readable idx.gz"):
        load_fashion_mnist("test", tmp_path)


def test_reads_idx_files_from_explicit_root(tmp_path):
    images = torch.randint(0, 255, (3, 28, 28), dtype=torch.uint8)
    labels = torch.tensor([1, 2, 3], dtype=torch.uint8)
    for split, (img, lab) in {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                              "t10k": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}.items():
        with gzip.open(tmp_path / img, "wb") as f:
            f.write(b"\x00\x00\x08\x03" + (3).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + images.numpy().tobytes())
        with gzip.open(tmp_path / lab, "wb") as f:
            f.write(b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + labels.numpy().tobytes())
    x, y = load_fashion_mnist("test", tmp_path)
    assert x.shape == (3, 1, 28, 28) and torch.equal(x[:, 0], images) and y.tolist() == [1, 2, 3]


@pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST not installed (make setup installs it)")
def test_fashion_mnist_shapes():
    x, y = load_fashion_mnist("test")
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.uint8
    assert y.min() == 0 and y.max() == 9


def test_unknown_dataset_and_missing_cifar():
    with pytest.raises(ValueError, match="dataset='mnist3d'"):
        build_datasets("mnist3d")
    with pytest.raises(DatasetNotFound, match="cifar-10-batches-py"):
        build_datasets("cifar10", root="/nonexistent")


def _data(**kw):
    images, labels = synthetic(64, 10, 28, 1, seed=0)
    return TensorData(images, labels, (0.5,), (0.25,), 10, **kw)


def test_batches_are_a_function_of_seed_and_epoch():
    data = _data(augment=True)
    a = list(data.batches(16, seed=1, epoch=2))
    b = list(data.batches(16, seed=1, epoch=2))
    c = list(data.batches(16, seed=1, epoch=3))
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert not torch.equal(a[0][1], c[0][1])
    resumed = list(data.batches(16, seed=1, epoch=2, start=2))
    assert len(resumed) == 2 and torch.equal(resumed[0][0], a[2][0])


def test_ranks_take_disjoint_shares():
    images, labels = synthetic(65, 10, 28, 1, seed=0)
    data = TensorData(images, torch.arange(65), (0.5,), (0.25,), 10)
    train = [torch.cat([y for _, y in data.batches(8, seed=0, epoch=0, rank=r, world=2, drop_last=True)])
             for r in range(2)]
    assert len(train[0]) == len(train[1]) == 32 and not set(train[0].tolist()) & set(train[1].tolist())
    assert data.num_batches(8, world=2, drop_last=True) == 4
    evals = [torch.cat([y for _, y in data.batches(8, shuffle=False, rank=r, world=2)]) for r in range(2)]
    assert sorted(torch.cat(evals).tolist()) == list(range(65))  # evaluation sees every image exactly once
    assert data.num_batches(8, world=2) == 5


def test_augmentation_keeps_shape_and_changes_pixels():
    data = _data(augment=True, pad=2)
    plain = _data(augment=False)
    (xa, _), (xp, _) = next(data.batches(64, seed=0)), next(plain.batches(64, seed=0))
    assert xa.shape == xp.shape == (64, 1, 28, 28)
    assert not torch.equal(xa, xp)


def test_subset_is_fixed():
    data = _data()
    assert torch.equal(data.subset(10, seed=3).labels, data.subset(10, seed=3).labels)
    assert len(data.subset(10)) == 10 and data.subset(None) is data


def test_train_classes_keep_labels_and_the_validation_draw():
    from workbench.data.classification import build_splits

    full = build_splits("synthetic", val_size=64, train_subset=None, test_subset=128, augment=False)
    part = build_splits("synthetic", val_size=64, train_subset=None, test_subset=128, augment=False,
                        classes=[0, 3])
    for whole, kept in zip(full, part):
        mask = (whole.labels == 0) | (whole.labels == 3)
        assert torch.equal(kept.labels, whole.labels[mask])  # the same images, labels unchanged, order kept
        assert torch.equal(kept.images, whole.images[mask])
        assert set(kept.labels.tolist()) <= {0, 3} and kept.num_classes == whole.num_classes
    small = build_splits("synthetic", val_size=64, train_subset=20, augment=False, classes=[0, 3])[0]
    assert len(small) == 20 and set(small.labels.tolist()) <= {0, 3}
    with pytest.raises(ValueError, match=r"train_classes \[12\] are not labels of synthetic \(0 to 9\)"):
        build_splits("synthetic", val_size=64, classes=[0, 12])


def test_train_classes_config_is_checked(tmp_path):
    from workbench.train.config import TrainConfig

    for bad in ([], [0, 0], [-1], ["0"], 3):
        with pytest.raises(ValueError, match="train_classes=.* is invalid: use a list of distinct labels"):
            TrainConfig(train_classes=bad).validate()
    TrainConfig(train_classes=[0, 1, 2, 3, 4]).validate()


def test_training_on_part_of_the_classes(tmp_path):
    from workbench.train.config import TrainConfig
    from workbench.train.trainer import train

    cfg = TrainConfig(dataset="synthetic", train_subset=64, test_subset=128, val_size=32, epochs=1, batch_size=32,
                      warmup_epochs=0.25, output=str(tmp_path / "run"), quiet=True, train_classes=[1, 2],
                      model_kwargs=dict(moe_layers="none", depth=1, embed_dim=16, num_heads=2), tensorboard=False)
    result = train(cfg)
    trainer_data = build_datasets("synthetic", test_subset=128)[1]
    expected = int(((trainer_data.labels == 1) | (trainer_data.labels == 2)).sum())
    assert result["history"][-1]["test_n"] == expected
