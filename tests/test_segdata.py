import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import timm  # noqa: F401  (imported before workbench.vimoe, as the package expects)
import torch
from PIL import Image

from workbench.data.classification import VAL_SEED, DatasetNotFound, build_splits, load_fashion_mnist
from workbench.data.scenes import (BACKGROUND_MAX, SCENE_CLASSES, SegTensorData, _resize_items, build_seg_splits, example_scenes, fmnist_scenes, make_scenes)
from workbench.models.vimoe import FASHION_MNIST_LABELS

HAVE_FMNIST = os.path.isfile("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz") or \
    bool(os.environ.get("WORKBENCH_DATA"))
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST not installed (make setup installs it)")
PINNED_COUNTS = [47474, 1752, 883, 2506, 1375, 2183, 420, 2988, 743, 1640, 756]  # 20 scenes, seed 0, test[:500]


@pytest.fixture(scope="module")
def items():
    images, labels = load_fashion_mnist("test")
    return images[:500], labels[:500]


@needs_fmnist
def test_scenes_are_a_function_of_the_seed(items):
    a = make_scenes(*items, 40, seed=0)
    b = make_scenes(*items, 40, seed=0)
    c = make_scenes(*items, 40, seed=1)
    assert a[0].shape == (40, 1, 56, 56) and a[1].shape == (40, 56, 56)
    assert a[0].dtype == a[1].dtype == torch.uint8
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])
    # pinned: the generator is bit-stable (numpy PCG64, integer and element-wise float32 arithmetic only)
    assert torch.bincount(make_scenes(*items, 20, seed=0)[1].flatten(), minlength=11).tolist() == PINNED_COUNTS


@needs_fmnist
def test_masks_hold_the_placed_items_and_the_top_item_wins(items):
    images, labels = items
    x, y, layout = make_scenes(images, labels, 60, seed=3, return_layout=True)
    assert int(y.max()) <= 10 and all((m == 0).any() for m in y)
    assert (x[:, 0][y == 0] <= BACKGROUND_MAX).all() and (x[:, 0][y > 0] > BACKGROUND_MAX).all()
    stacked = 0
    for i in range(len(y)):
        used = layout.sources[i] >= 0
        placed = set((labels[layout.sources[i][used]] + 1).tolist())
        present = set(y[i].unique().tolist()) - {0}
        assert present <= placed
        j = int(used.sum()) - 1  # the top item: its own pixels show it, whatever lies below
        src, top, left, side = (int(t[i, j]) for t in layout)
        pixels, own = _resize_items(images[src:src + 1, 0].numpy(), side)
        ys, xs = np.nonzero(own[0])
        inside = (ys + top >= 0) & (ys + top < 56) & (xs + left >= 0) & (xs + left < 56)
        assert inside.any()
        ys, xs = ys[inside], xs[inside]
        assert (y[i, ys + top, xs + left] == labels[src] + 1).all()
        assert (x[i, 0, ys + top, xs + left].numpy() == pixels[0, ys, xs]).all()
        stacked += j > 0
    assert stacked > 20  # the check above covered occlusion


@needs_fmnist
def test_train_val_and_test_scenes_draw_from_disjoint_items():
    _, train_masks, train_src = fmnist_scenes("train", 300, val_size=200)
    _, _, val_src = fmnist_scenes("val", 100, val_size=200)
    test_x, _, test_src = fmnist_scenes("test", 100)
    train_used, val_used = set(train_src[train_src >= 0].tolist()), set(val_src[val_src >= 0].tolist())
    held_out = torch.randperm(60000, generator=torch.Generator().manual_seed(VAL_SEED))[:200]
    assert val_used <= set(held_out.tolist()) and not train_used & set(held_out.tolist())
    _, val, _ = build_splits("fashion-mnist", val_size=200, test_subset=10)  # the classifier's validation images
    train_images, _ = load_fashion_mnist("train")
    assert torch.equal(val.images, train_images[held_out])
    assert int(test_src.max()) < 10000 and len(set(test_src[test_src >= 0].tolist())) > 150
    assert torch.equal(example_scenes(3)[0], fmnist_scenes("test", 2000)[0][:3])


@needs_fmnist
def test_scenes_of_some_classes_hold_only_their_items_after_the_same_validation_draw():
    """A transfer base's scenes: items of the listed labels only, in every split; the validation items still come
    from the classifier's held-out images, and a bad list is a one-line error."""
    train_images, labels = load_fashion_mnist("train")
    test_labels = load_fashion_mnist("test")[1]
    held_out = set(torch.randperm(60000, generator=torch.Generator().manual_seed(VAL_SEED))[:200].tolist())
    for split, n, source_labels in (("train", 200, labels), ("val", 100, labels), ("test", 100, test_labels)):
        _, masks, src = fmnist_scenes(split, n, val_size=200, classes=[4, 0, 2])
        used = src[src >= 0]
        assert set(source_labels[used].tolist()) == {0, 2, 4}, split
        assert set(masks.unique().tolist()) == {0, 1, 3, 5}, split  # background + label + 1
        if split != "test":
            assert (set(used.tolist()) <= held_out) == (split == "val")
    train, val, test = build_seg_splits("fmnist-scenes", val_size=200, train_size=64, classes=[0, 1])
    assert train.num_classes == 11 and set(test.masks.unique().tolist()) <= {0, 1, 2}
    for bad in ([], [10], [-1], 3, "0-4", [True], [0.5]):
        with pytest.raises(ValueError, match="non-empty list of Fashion-MNIST labels"):
            fmnist_scenes("train", 10, val_size=200, classes=bad)


def _seg_data(n=24, augment=False):
    images = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return SegTensorData(images, (images[:, 0] > 128).to(torch.uint8), (0.5,), (0.25,), 2, ("dark", "light"),
                         augment=augment)


def test_batches_shapes_and_exact_resume():
    data = _seg_data(augment=True)
    full = list(data.batches(5, seed=1, epoch=2))
    again = list(data.batches(5, seed=1, epoch=2))
    resumed = list(data.batches(5, seed=1, epoch=2, start=2))
    assert len(full) == data.num_batches(5) == 5 and len(resumed) == 3
    x, y = full[0]
    assert x.shape == (5, 1, 8, 8) and x.dtype == torch.float32 and y.shape == (5, 8, 8) and y.dtype == torch.long
    for (x1, y1), (x2, y2) in zip(full, again):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    for (x1, y1), (x2, y2) in zip(full[2:], resumed):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(full[0][1], next(data.batches(5, seed=1, epoch=3))[1])
    assert len(data.subset(10, seed=3)) == 10 and torch.equal(data.subset(10, seed=3).masks, data.subset(10, 3).masks)


def test_flip_moves_image_and_mask_together():
    flipped, plain = _seg_data(augment=True), _seg_data()
    (x, y), (xp, yp) = next(flipped.batches(24, seed=0)), next(plain.batches(24, seed=0))
    assert torch.equal((x[:, 0] * 0.25 + 0.5 > 128.5 / 255).long(), y)
    changed = [not torch.equal(a, b) for a, b in zip(x, xp)]
    assert 0 < sum(changed) < 24 and all(torch.equal(y[i].flip(-1), yp[i]) for i in range(24) if changed[i])


def _ade(root, sizes=((32, 32),) * 4, test=2, mode="L", suffix=".png"):
    rng = np.random.default_rng(0)
    for split, count in (("training", len(sizes)), ("validation", test)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i, (h, w) in enumerate(sizes[:count]):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / split /
                                                                                   f"img{i}{suffix}")
            label = np.zeros((h, w), np.uint8)
            label[: h // 2, : w // 2], label[h // 2:, w // 2:] = i % 4, 3  # quadrants: 0..3 and 3
            ann = Image.fromarray(label)
            if mode == "P":
                ann = ann.convert("P")
                ann.putpalette([v for k in range(256) for v in (k, 255 - k, k)])
            ann.save(root / "annotations" / split / f"img{i}.png")
    return root


@pytest.mark.parametrize("mode", ["L", "P"])
def test_ade_folder_with_both_label_conventions(tmp_path, mode):
    root = _ade(tmp_path, mode=mode)
    train, val, test = build_seg_splits("ade", root=root, val_size=1, augment=False)
    assert len(train) == 3 and len(val) == 1 and len(test) == 2
    assert train.num_classes == 3 and train.ignore_index == 255 and train.images.shape[1:] == (3, 32, 32)
    masks = torch.cat([train.masks, val.masks])
    assert set(masks.unique().tolist()) == {0, 1, 2, 255} and (masks[:, 20, 20] == 2).all()  # 3 -> 2, 0 -> ignore
    train, val, test = build_seg_splits("ade", root=root, reduce_zero_label=False, img_size=16)
    assert val is None and train.num_classes == 4 and train.images.shape[1:] == (3, 16, 16)
    assert train.masks.shape == (4, 16, 16) and set(train.masks[:, 12, 12].tolist()) == {3}
    assert sorted(train.masks[:, 4, 4].tolist()) == [0, 1, 2, 3] and train.augment and not test.augment
    grey = SimpleNamespace(pretrained_cfg={"input_size": (1, 24, 24), "mean": (0.3,), "std": (0.2,)})
    train, _, _ = build_seg_splits("ade", root=root, model=grey)
    assert train.images.shape[1:] == (1, 24, 24) and train.mean == (0.3,)
    assert len(train.class_names) == 3 and next(train.batches(2))[1].dtype == torch.long


def _bad(root, name):
    """Break the ADE folder at ``root`` in the way ``name`` says; returns the file the message must name."""
    images, annotations = root / "images" / "training", root / "annotations" / "training"
    if name == "size":
        Image.fromarray(np.zeros((20, 32), np.uint8)).save(annotations / "img1.png")
        return "img1.png"
    if name == "label":
        Image.fromarray(np.full((32, 32), 9, np.uint8)).save(annotations / "img2.png")
        return "img2.png"
    if name == "no-annotation":
        (annotations / "img3.png").unlink()
        return "img3.png"
    if name == "no-image":
        (images / "img0.png").unlink()
        return "img0.png"
    if name == "folder":
        shutil.rmtree(annotations)
        return "annotations/training"
    if name == "unreadable":
        (images / "img2.png").write_bytes(b"not an image\n")
        return "img2.png"
    if name == "rgb-annotation":
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(annotations / "img1.png")
        return "img1.png"
    if name == "mixed-sizes":
        Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(images / "img3.png")
        Image.fromarray(np.zeros((20, 24), np.uint8)).save(annotations / "img3.png")
        return "img3.png"
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["size", "label", "no-annotation", "no-image", "folder", "unreadable",
                                  "rgb-annotation", "mixed-sizes"])
def test_bad_folders_name_the_file_in_one_line(tmp_path, name):
    root = _ade(tmp_path)
    culprit = _bad(root, name)
    options = {"num_classes": 4, "reduce_zero_label": False} if name == "label" else {}
    with pytest.raises((ValueError, DatasetNotFound)) as err:
        build_seg_splits("ade", root=root, **options)
    message = str(err.value)
    assert culprit in message and "\n" not in message and ";" in message  # what is wrong; how to fix it


@needs_fmnist
def test_scene_splits_and_options():
    train, val, test = build_seg_splits("fmnist-scenes", val_size=50, train_size=200, train_subset=100, seed=1)
    assert (len(train), len(val), len(test)) == (100, 50, 2000)
    assert train.num_classes == 11 and train.class_names == ("background",) + FASHION_MNIST_LABELS == SCENE_CLASSES
    assert train.augment and not val.augment and not test.augment and train.mean == (0.2860,)
    x, y = next(test.batches(8, shuffle=False))
    assert x.shape == (8, 1, 56, 56) and y.shape == (8, 56, 56) and int(y.max()) <= 10
    rgb = SimpleNamespace(pretrained_cfg={"input_size": (3, 56, 56)})
    train, val, _ = build_seg_splits("fmnist-scenes", model=rgb, train_size=200, test_subset=10)
    assert val is None and train.images.shape == (200, 3, 56, 56) and len(train.mean) == 3
    small = SimpleNamespace(pretrained_cfg={"input_size": (1, 28, 28)})  # canvas and items follow the model's size
    train, _, test = build_seg_splits("fmnist-scenes", model=small, train_size=50, test_subset=10)
    assert train.images.shape == (50, 1, 28, 28) and test.masks.shape == (10, 28, 28)
    assert 0.05 < (train.masks > 0).float().mean() < 0.5
    with pytest.raises(ValueError, match="dataset='voc'"):
        build_seg_splits("voc")
    with pytest.raises(ValueError, match="unknown option"):
        build_seg_splits("fmnist-scenes", img_size=64)


@needs_fmnist
def test_pixel_labels_are_the_test_masks_at_the_patch_centres_that_records_keep(tmp_path):
    """regime.pixel_labels: the true label at each pixel whose prediction a segmentation record keeps (the centre
    of every 7x7 patch of the first 1,000 test scenes), for splitting the predictions-moved shares by class."""
    from workbench.studies import regime
    from workbench.train.checkpoint import model_config, save_model

    kw = {"moe_layers": "none", "head": "linear"}
    save_model(timm.create_model("vimoe_seg_micro_patch7_56", **kw), model_config("vimoe_seg_micro_patch7_56", kw),
               tmp_path / "base")
    study = {"base": str(tmp_path / "base"), "train": {"dataset": "fmnist-scenes", "val_size": 200,
                                                       "data_options": {"train_size": 16}}}
    labels = regime.pixel_labels(study)
    masks = fmnist_scenes("test", 2000)[1]
    assert len(labels) == 1000 * 64 and labels[:64] == masks[0, 3::7, 3::7].flatten().tolist()
    assert labels[-64:] == masks[999, 3::7, 3::7].flatten().tolist() and set(labels) == set(range(11))
