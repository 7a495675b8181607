"""The shipped checkpoints: present, loadable both ways, carrying their provenance."""
import json
from pathlib import Path

import pytest
import timm
import torch

from workbench.checkpoint import load_model
from workbench.explorer import DEFAULT_CHECKPOINT, Explorer, example_images

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = [DEFAULT_CHECKPOINT, ROOT / "experiments" / "checkpoints" / "vimoe_tiny_fmnist_dense"]


@pytest.mark.parametrize("folder", SHIPPED, ids=lambda p: p.name)
def test_shipped_checkpoint_loads_with_provenance(folder):
    model, config = load_model(folder)
    record = json.loads((folder / "config.json").read_text())
    assert record["provenance"]["commit"] and record["provenance"]["device"]
    assert record["train_config"]["dataset"] == "fashion-mnist" and record["train_config"]["train_subset"] is None
    assert 0.1 < record["shipped_test"]["acc"] <= 1 and record["shipped_test"]["n"] == 10000
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == record["train_config"]["epochs"]


def test_default_is_a_vimoe_and_loads_through_timm_too():
    model, config = load_model(DEFAULT_CHECKPOINT)
    assert model.moe_layer_indices == [4, 5] and config["model_kwargs"]["shared_expert"] == "add"
    via_timm = timm.create_model(config["model"], pretrained=True, **config["model_kwargs"],
                                 pretrained_cfg_overlay=dict(file=str(DEFAULT_CHECKPOINT / "model.safetensors"))).eval()
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(via_timm(x), model(x))


def test_default_routes_the_examples():
    analysis = Explorer().analyse(example_images()[-1])  # an ankle boot
    assert analysis.layers == [4, 5] and analysis.experts[5].shape == (7, 7)
    assert next(iter(analysis.top5)) in ("Ankle boot", "Sneaker", "Sandal")
