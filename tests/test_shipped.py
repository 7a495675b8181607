"""The shipped checkpoints: present, loadable both ways, carrying their provenance."""
import json
from pathlib import Path

import pytest
import timm
import torch

from workbench.train.checkpoint import load_model
from workbench.data.classification import DatasetNotFound, build_datasets
from workbench.explorer import DEFAULT_CHECKPOINT, Explorer, example_images
from workbench.train.metrics import evaluate


def _docs() -> str:
    """What a reader is told about the recorded results: the README and its study pages (docs/studies.md)."""
    root = Path(__file__).resolve().parents[1]
    return (root / "README.md").read_text() + "\n" + (root / "docs" / "studies.md").read_text()


ROOT = Path(__file__).resolve().parents[1]
REGIME = ROOT / "experiments" / "checkpoints" / "vimoe_micro4_fmnist"  # upcycle4-regime's last-2-shared, seed 301
SHIPPED = [DEFAULT_CHECKPOINT, REGIME, ROOT / "experiments" / "checkpoints" / "vimoe_tiny_fmnist",
           ROOT / "experiments" / "checkpoints" / "vimoe_tiny_fmnist_dense",
           ROOT / "experiments" / "checkpoints" / "vimoe_micro_fmnist_dense",  # upcycle_p7's base (88.68%)
           ROOT / "experiments" / "checkpoints" / "vimoe_micro4_fmnist_dense",  # the upcycle studies' base (4x4)
           ROOT / "experiments" / "checkpoints" / "vimoe_micro4_fmnist_dense_avg"]  # its avg-pooled twin
# What ship.py recorded: the shipped (fp16-stored) weights on the full 10k Fashion-MNIST test set, and the last
# training epoch's test accuracy before the fp16 round trip.
RECORDED_TEST_ACC = {"vimoe_micro_fmnist_scratch": 0.789, "vimoe_micro4_fmnist": 0.8979, "vimoe_tiny_fmnist": 0.8622, "vimoe_tiny_fmnist_dense": 0.8498, "vimoe_micro_fmnist_dense": 0.8868,
                     "vimoe_micro4_fmnist_dense": 0.9018, "vimoe_micro4_fmnist_dense_avg": 0.9228}
LAST_EPOCH_TEST_ACC = {"vimoe_micro_fmnist_scratch": 0.789, "vimoe_micro4_fmnist": 0.8977, "vimoe_tiny_fmnist": 0.8619, "vimoe_tiny_fmnist_dense": 0.8498, "vimoe_micro_fmnist_dense": 0.8868,
                       "vimoe_micro4_fmnist_dense": 0.9018, "vimoe_micro4_fmnist_dense_avg": 0.9227}
# The shipped weights on a fixed 500-image subset of the test set (build_datasets(test_subset=500), seed 0), CPU,
# fp32, one thread: correct predictions, computed once (the full 10k take a minute; these take seconds).
SUBSET = 500
SUBSET_CORRECT = {"vimoe_micro_fmnist_scratch": 401, "vimoe_micro4_fmnist": 448, "vimoe_tiny_fmnist": 434, "vimoe_tiny_fmnist_dense": 423, "vimoe_micro_fmnist_dense": 447,
                  "vimoe_micro4_fmnist_dense": 452, "vimoe_micro4_fmnist_dense_avg": 459}
SUBSET_LOSS = {"vimoe_micro_fmnist_scratch": 0.6072448120117188, "vimoe_micro4_fmnist": 0.34114736938476564, "vimoe_tiny_fmnist": 0.42604998779296877, "vimoe_tiny_fmnist_dense": 0.4629532470703125,
               "vimoe_micro_fmnist_dense": 0.3709040832519531, "vimoe_micro4_fmnist_dense": 0.33061642456054685,
               "vimoe_micro4_fmnist_dense_avg": 0.2795673217773437}


@pytest.mark.parametrize("folder", SHIPPED, ids=lambda p: p.name)
def test_shipped_checkpoint_loads_with_provenance(folder):
    model, config = load_model(folder)
    record = json.loads((folder / "config.json").read_text())
    assert record["provenance"]["commit"] and record["provenance"]["device"]
    assert record["train_config"]["dataset"] == "fashion-mnist" and record["train_config"]["train_subset"] is None
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == record["train_config"]["epochs"]


@pytest.mark.parametrize("folder", SHIPPED, ids=lambda p: p.name)
def test_shipped_record_holds_the_accuracy_it_was_shipped_with(folder):
    record = json.loads((folder / "config.json").read_text())
    shipped = record["shipped_test"]
    assert shipped["n"] == 10000 and shipped["acc"] == RECORDED_TEST_ACC[folder.name]
    assert shipped["acc"] * shipped["n"] == pytest.approx(round(shipped["acc"] * shipped["n"]), abs=1e-6)
    last = json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])
    assert last == record["metrics"] and last["test_n"] == 10000
    assert last["test_acc"] == LAST_EPOCH_TEST_ACC[folder.name]
    # the fp16 storage changes at most a handful of the 10k predictions
    assert abs(shipped["acc"] - last["test_acc"]) * 10000 <= 5


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU results are bit-reproducible only at a fixed thread count
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("folder", SHIPPED, ids=lambda p: p.name)
def test_shipped_weights_reproduce_their_accuracy_on_a_fixed_subset(folder, one_thread):
    model, _ = load_model(folder)
    try:
        _, test = build_datasets("fashion-mnist", model=model, test_subset=SUBSET, num_workers=0)
    except DatasetNotFound as err:
        pytest.skip(f"Fashion-MNIST is not installed: {err}")
    result = evaluate(model, test)
    assert result["n"] == SUBSET
    assert round(result["acc"] * SUBSET) == SUBSET_CORRECT[folder.name]
    # bit-identical on this machine's torch build; a tolerance for other CPUs' kernels
    assert result["loss"] == pytest.approx(SUBSET_LOSS[folder.name], rel=1e-6)


def test_default_is_a_vimoe_and_loads_through_timm_too():
    model, config = load_model(DEFAULT_CHECKPOINT)
    assert model.moe_layer_indices == [2, 3] and config["model_kwargs"]["top_k"] == 2
    via_timm = timm.create_model(config["model"], pretrained=True, **config["model_kwargs"],
                                 pretrained_cfg_overlay=dict(file=str(DEFAULT_CHECKPOINT / "model.safetensors"))).eval()
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(via_timm(x), model(x))


def test_default_routes_the_examples():
    analysis = Explorer().analyse(example_images()[-1])  # an ankle boot
    assert analysis.layers == [2, 3] and analysis.experts[3].shape == (4, 4)  # 7x7 patches of 28x28
    assert next(iter(analysis.top5)) in ("Ankle boot", "Sneaker", "Sandal")



def test_regime_checkpoint_is_its_study_record_retrained_and_its_card_is_shipped():
    """vimoe_micro4_fmnist retrains upcycle4-regime's last-2-shared seed 301 (experiments/default/moe_micro4.yaml):
    every epoch's test and validation accuracy equal the study record's (deterministic CPU, one thread), and its
    card (random-router verdicts, computed on held-out validation images) ships with it, keyed by its weights."""
    from workbench.analysis.card import weights_hash

    record = json.loads((ROOT / "experiments/results/upcycle4-regime/last-2-shared__seed301.json").read_text())
    shipped = [json.loads(line) for line in (REGIME / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["test_acc"], r["val_acc"]) for r in shipped] == \
        [(h["epoch"], h["test_acc"], h["val_acc"]) for h in record["history"]]
    config = json.loads((REGIME / "config.json").read_text())
    assert config["model_kwargs"] == record["model_config"]["model_kwargs"]
    assert {k: config["train_config"][k] for k in ("seed", "epochs", "lr", "val_size", "shared_init")} == \
        {k: record["train_config"][k] for k in ("seed", "epochs", "lr", "val_size", "shared_init")}
    card = json.loads((REGIME / "model_card.json").read_text())
    assert card["weights_sha256"] == weights_hash(REGIME) and set(card["layers"]) == {"2", "3"}
    assert card["test"]["draws"] == 100 and card["test"]["images"] == 2000 and not card["test"]["seen_in_training"]
    # the README quotes the card: its numbers must be the card's
    readme = " ".join(_docs().split())
    two, three = card["layers"]["2"], card["layers"]["3"]
    assert (f"block 2 NMI {two['nmi']:.3f} against {two['random_nmi']:.3f} for random routers, Holm p "
            f"{two['p_holm']:.3f}; block 3 p {three['p_holm']:.3f}") in readme
    assert f"`vimoe_micro4_fmnist` ({config['shipped_test']['acc']:.2%})" in readme
    assert not two["specialised"] and not three["specialised"]  # as the README says


def test_default_routing_beats_random_routers_in_its_shipped_card():
    """The explorer's default was shipped for routing worth exploring: its card (100 random routers per layer, the
    first 2,000 held-out validation images, Holm) calls both MoE blocks specialised, and the README quotes it."""
    from workbench.analysis.card import weights_hash

    card = json.loads((DEFAULT_CHECKPOINT / "model_card.json").read_text())
    config = json.loads((DEFAULT_CHECKPOINT / "config.json").read_text())
    assert card["weights_sha256"] == weights_hash(DEFAULT_CHECKPOINT) and config["train_config"]["val_size"] == 10000
    assert card["test"]["draws"] == 100 and card["test"]["images"] == 2000 and not card["test"]["seen_in_training"]
    assert {b: v["specialised"] for b, v in card["layers"].items()} == {"2": True, "3": True}
    readme = " ".join(_docs().split())
    two, three = card["layers"]["2"], card["layers"]["3"]
    assert (f"block 2 NMI {two['nmi']:.3f} against {two['random_nmi']:.3f}, block 3 {three['nmi']:.3f} against "
            f"{three['random_nmi']:.3f}, Holm p {two['p_holm']:.3f} each") in readme
    assert f"({config['shipped_test']['acc']:.2%} test accuracy" in readme
    # why this config: its study records (the last block beats random routers in nearly every seed), as quoted
    records = [json.loads(p.read_text())
               for p in sorted((ROOT / "experiments/results/scratch-confirm").glob("last-2-top2__seed*.json"))]
    passed = sum(r["routing"]["3"]["specialised"] for r in records)
    assert f"in {passed} of the {len(records)} recorded seeds" in readme
    assert config["train_config"]["seed"] == 103 and all(
        v["specialised"] for r in records if r["seed"] == 103 for v in r["routing"].values())


SEG = ROOT / "experiments" / "checkpoints" / "vimoe_seg_micro_scenes"


def test_shipped_segmentation_checkpoint_scores_exactly_what_was_recorded():
    """The shipped segmentation ViMoE: its record (mIoU on the 2,000 test scenes after the fp16 round trip), and the
    weights on the first 200 test scenes (test_subset=200, seed 0), CPU fp32 one thread, computed once, exactly."""
    from workbench.data.scenes import build_seg_splits

    model, _ = load_model(SEG)
    record = json.loads((SEG / "config.json").read_text())
    assert model.task == "segmentation" and record["train_config"]["dataset"] == "fmnist-scenes"
    assert round(record["shipped_test"]["miou"], 4) == 0.3931 and record["shipped_test"]["n"] == 2000
    assert not record["provenance"]["commit"].endswith("+dirty")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, _, test = build_seg_splits("fmnist-scenes", model=model, augment=False, test_subset=200)
        result = evaluate(model, test)
    finally:
        torch.set_num_threads(threads)
    assert (result["miou"], result["pixel_acc"], result["n"]) == (0.41271253414302805, 0.8773612882653061, 200)


def test_ship_records_the_tree_as_it_was_before_it_wrote(tmp_path, monkeypatch):
    """ship's provenance is taken before it creates the destination folder, so that shipping into the repository
    does not mark its own record '+dirty' (it did: vimoe_micro4_fmnist_dense_avg was re-shipped after this fix)."""
    from workbench.train import ship as ship_module
    from workbench.train.checkpoint import model_config, save_model

    kw = {"moe_layers": "none", "depth": 1, "embed_dim": 16, "num_heads": 2}
    run, dest = tmp_path / "run", tmp_path / "shipped"
    save_model(timm.create_model("vimoe_tiny_patch4_28", **kw), model_config("vimoe_tiny_patch4_28", kw), run / "model")
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "test_acc": 0.5, "wall_time": 12.5}) + "\n")
    (run / "train_config.json").write_text(json.dumps({"dataset": "fashion-mnist", "epochs": 1}))
    seen = []
    monkeypatch.setattr(ship_module, "provenance", lambda *a, **k: seen.append(dest.exists()) or {"commit": "c"})
    monkeypatch.setattr(ship_module, "build_datasets", lambda *a, **k: (None, None))
    monkeypatch.setattr(ship_module, "evaluate", lambda model, data: {"acc": 0.5, "loss": 1.0, "n": 10})
    ship_module.ship(run, dest)
    record = json.loads((dest / "config.json").read_text())
    assert seen == [False] and record["provenance"] == {"commit": "c", "wall_time_s": 12.5}
    assert record["shipped_test"] == {"acc": 0.5, "loss": 1.0, "n": 10}


def test_transfer_base_knows_only_its_five_classes(one_thread):
    """vimoe_micro_fmnist_dense_half (experiments/upcycle/dense_half.yaml): pretrained on labels 0-4 only; scored on
    its own classes while it trained (90.96% of their 5,000 test images), on all ten when shipped (45.48%)."""
    folder = ROOT / "experiments" / "checkpoints" / "vimoe_micro_fmnist_dense_half"
    model, _ = load_model(folder)
    record = json.loads((folder / "config.json").read_text())
    assert record["provenance"]["commit"] == "dc2f90a2af7eea28627388cca00bc7a93cb67840"  # clean: no '+dirty'
    assert record["train_config"]["train_classes"] == [0, 1, 2, 3, 4]
    last = json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])
    assert (last["test_n"], last["test_acc"]) == (5000, 0.9096) and len(record["train_config"]) > 0
    assert record["shipped_test"]["n"] == 10000 and record["shipped_test"]["acc"] == 0.4548
    try:
        _, test = build_datasets("fashion-mnist", model=model, test_subset=SUBSET, num_workers=0)
    except DatasetNotFound as err:
        pytest.skip(f"Fashion-MNIST is not installed: {err}")
    result = evaluate(model, test)
    assert round(result["acc"] * SUBSET) == 238 and result["loss"] == pytest.approx(2.28546728515625, rel=1e-6)
    old = test.only_classes([0, 1, 2, 3, 4])
    assert len(old) == 265 and round(evaluate(model, old)["acc"] * len(old)) == 238  # every hit is an old class
