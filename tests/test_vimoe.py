import os
import tempfile

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

import workbench
from workbench import resolve_moe_layers, upcycle
from workbench.moe import MoEMlp


@pytest.mark.parametrize("spec, expected", [
    ("none", []), ("all", [0, 1, 2, 3, 4, 5]), ("last-2", [4, 5]), ("first-2", [0, 1]), ("every-2", [1, 3, 5]),
    ("every-3", [2, 5]), ("vmoe-last-2", [3, 5]), ("vmoe-last-3", [1, 3, 5]), ([0, -1], [0, 5]), ((2,), [2]),
    ("LAST-1", [5]),
])
def test_moe_layer_specs(spec, expected):
    assert resolve_moe_layers(spec, 6) == expected


@pytest.mark.parametrize("spec, message", [
    ("last-7", "L must be in 1..6"), ("last-0", "L must be in 1..6"), ("vmoe-last-4", "L must be in 1..3"),
    ("every-0", "N must be in 1..6"), ("middle-2", "not a known spec"), ([6], "out of range"), ([-7], "out of range"),
    ([1, 1], "twice"), (["a"], "not a known spec"),
])
def test_bad_moe_layer_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        resolve_moe_layers(spec, 6)


def test_create_model_passes_moe_kwargs():
    model = timm.create_model("vimoe_tiny_patch4_28", moe_layers="every-2", num_experts=4, top_k=2,
                              shared_expert="add", capacity_factor=1.25, routing="image")
    assert model.moe_layer_indices == [1, 3, 5]
    layer = model.blocks[1].mlp
    assert isinstance(layer, MoEMlp) and layer.num_experts == 4 and layer.top_k == 2
    assert layer.capacity_factor == 1.25 and layer.routing == "image" and layer.shared is not None
    assert not isinstance(model.blocks[0].mlp, MoEMlp)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert model.pretrained_cfg["label_names"][0] == "T-shirt/top"
    assert model.pretrained_cfg["input_size"] == (1, 28, 28)


def test_registered_models():
    names = timm.list_models("vimoe_*")
    assert set(workbench.MODEL_NAMES) <= set(names)
    small = timm.create_model("vimoe_small_patch16_224", moe_layers="vmoe-last-2", num_classes=0)
    assert small.moe_layer_indices == [9, 11]
    base = timm.create_model("vimoe_base_patch14_dinov2", moe_layers="last-2", num_experts=2, num_classes=0)
    assert base.patch_embed.patch_size == (14, 14) and base.blocks[0].ls1 is not None


@pytest.mark.parametrize("kwargs, field", [
    (dict(top_k=9), "top_k"), (dict(moe_layers="last-9"), "moe_layers"), (dict(moe_layers=[0, 99]), "moe_layers"),
    (dict(capacity_factor=0.0), "capacity_factor"), (dict(shared_expert="yes"), "shared_expert"),
])
def test_create_model_config_errors(kwargs, field):
    with pytest.raises(ValueError, match=field):
        timm.create_model("vimoe_tiny_patch4_28", **kwargs)


def test_forward_features_and_intermediates():
    model = timm.create_model("vimoe_tiny_patch4_28", moe_layers="last-2").eval()
    x = torch.randn(2, 1, 28, 28)
    assert model.forward_features(x).shape == (2, 50, 192)
    final, inter = model.forward_intermediates(x, indices=[1, 4])
    assert final.shape == (2, 50, 192) and [t.shape for t in inter] == [(2, 192, 7, 7)] * 2


def test_state_dict_round_trip():
    a = timm.create_model("vimoe_tiny_patch4_28", moe_layers="last-2", shared_expert="gated").eval()
    b = timm.create_model("vimoe_tiny_patch4_28", moe_layers="last-2", shared_expert="gated").eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(a(x), b(x))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "w.safetensors")
        save_file(a.state_dict(), path)
        c = timm.create_model("vimoe_tiny_patch4_28", pretrained=True, pretrained_cfg_overlay=dict(file=path),
                              moe_layers="last-2", shared_expert="gated").eval()
    torch.testing.assert_close(a(x), c(x))


def _dense_tiny():
    return timm.create_model("vimoe_tiny_patch4_28", moe_layers="none").eval()


@pytest.mark.parametrize("kwargs", [
    dict(top_k=1, renormalize=True), dict(top_k=2, renormalize=True), dict(top_k=3, renormalize=True,
                                                                           capacity_factor=None),
    dict(top_k=1, renormalize=True, routing="image"),
    dict(top_k=2, renormalize=True, shared_expert="add", shared_init="zero"),
    dict(top_k=1, renormalize=True, shared_expert="gated", shared_init="zero"),
])
def test_upcycling_preserves_the_function(kwargs):
    dense = _dense_tiny()
    moe = upcycle(dense, "all", num_experts=4, **kwargs).eval()
    assert len(moe.moe_layer_indices) == 6 and dense.moe_layer_indices == []
    x = torch.randn(5, 1, 28, 28)
    assert (moe(x) - dense(x)).abs().max().item() < 1e-5


def test_upcycling_with_unnormalised_top1_scales_by_the_gate():
    dense = _dense_tiny()
    moe = upcycle(dense, [5], num_experts=4, top_k=1)
    layer = moe.blocks[5].mlp
    layer.capture_routing = True
    x = torch.randn(2, 50, 192)
    y = layer(x)
    gate = layer.last_routing["gates"].view(2, 50, 1)
    torch.testing.assert_close(y, gate * dense.blocks[5].mlp(x), atol=1e-5, rtol=1e-5)


def test_upcycling_shared_copy_doubles_ffn():
    dense = _dense_tiny()
    moe = upcycle(dense, [5], num_experts=4, top_k=1, renormalize=True, shared_expert="add")
    x = torch.randn(2, 50, 192)
    torch.testing.assert_close(moe.blocks[5].mlp(x), 2 * dense.blocks[5].mlp(x), atol=1e-5, rtol=1e-5)


def test_upcycle_any_timm_vit_including_dinov2_layout():
    dino_like = VisionTransformer(img_size=28, patch_size=14, embed_dim=32, depth=4, num_heads=2, init_values=1e-5,
                                  num_classes=0, reg_tokens=4).eval()
    moe = upcycle(dino_like, "last-2", num_experts=4, top_k=2, renormalize=True).eval()
    x = torch.randn(2, 3, 28, 28)
    assert (moe(x) - dino_like(x)).abs().max().item() < 1e-5
    assert moe.blocks[3].mlp.num_prefix_tokens == 5


def test_upcycle_errors():
    dense = _dense_tiny()
    moe = upcycle(dense, "last-1", num_experts=2)
    with pytest.raises(ValueError, match="already an MoE"):
        upcycle(moe, "last-1")
    with pytest.raises(ValueError, match="expert_hidden"):
        upcycle(dense, "last-1", expert_hidden=100)
    with pytest.raises(ValueError, match="shared_init"):
        upcycle(dense, "last-1", shared_init="clone")
    with pytest.raises(ValueError, match="VisionTransformer"):
        upcycle(torch.nn.Linear(2, 2))


def test_dense_checkpoint_upcycles_on_load_through_timm():
    dense = _dense_tiny()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "dense.safetensors")
        save_file(dense.state_dict(), path)
        moe = timm.create_model("vimoe_tiny_patch4_28", pretrained=True, pretrained_cfg_overlay=dict(file=path),
                                moe_layers="last-2", top_k=2, renormalize=True).eval()
    x = torch.randn(3, 1, 28, 28)
    assert (moe(x) - dense(x)).abs().max().item() < 1e-5
    torch.testing.assert_close(moe.blocks[5].mlp.w1[3], dense.blocks[5].mlp.fc1.weight.t())
