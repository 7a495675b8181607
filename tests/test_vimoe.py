import os
import tempfile

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

import workbench
from workbench import resolve_moe_layers, upcycle
from workbench.moe import MoEMlp, moe_aux_loss, moe_modules


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


# -- timm's generic model checks (its tests/test_models.py), run on a ViMoE with MoE layers ---------------------
# torchscript is not covered: timm treats it as optional, and routing (dataclasses, autograd Functions) is not
# scriptable.
TIMM_NAME = "vimoe_tiny_patch4_28"
TIMM_KWARGS = dict(moe_layers="every-2", num_experts=4, top_k=2, shared_expert="add")


def _timm_input(model, batch=2, **kw):
    return torch.randn(batch, *model.pretrained_cfg["input_size"], **kw)


def test_timm_generic_forward_and_backward():
    model = timm.create_model(TIMM_NAME, num_classes=42, **TIMM_KWARGS).train()
    assert model.moe_layer_indices == [1, 3, 5]
    out = model(_timm_input(model))
    out.mean().backward()
    assert out.shape == (2, 42) and not torch.isnan(out).any()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []  # router, experts, shared expert too
    assert sum(p.numel() for p in model.parameters()) == sum(p.grad.numel() for p in model.parameters())


def test_timm_generic_default_cfg_and_classifier():
    model = timm.create_model(TIMM_NAME, **TIMM_KWARGS).eval()
    cfg, state = model.pretrained_cfg, model.state_dict()
    assert cfg["classifier"] + ".weight" in state and cfg["first_conv"] + ".weight" in state
    x = _timm_input(model, 1)
    assert model.forward_features(x).shape == (1, 50, model.num_features)
    assert model.get_classifier() is model.head and model.head.out_features == 10
    model.reset_classifier(5)
    assert model.get_classifier().out_features == 5 and model.num_classes == 5
    assert model(_timm_input(model)).shape == (2, 5)
    model.reset_classifier(0)  # pooled features, no classifier
    assert model(x).shape == (1, model.num_features)
    model.reset_classifier(0, "")  # no pooling either: every token
    assert model(x).shape == (1, 50, model.num_features)


@pytest.mark.parametrize("out_indices", [None, (1, 3, 5)])
def test_timm_generic_features_only(out_indices):
    extra = {} if out_indices is None else {"out_indices": out_indices}
    model = timm.create_model(TIMM_NAME, features_only=True, **TIMM_KWARGS, **extra).eval()
    channels = model.feature_info.channels()
    outputs = model(_timm_input(model))
    assert len(outputs) == len(channels) == 3
    for c, o in zip(channels, outputs):
        assert o.shape == (2, c, 7, 7) and not torch.isnan(o).any()
    assert len(moe_modules(model)) >= 2  # the feature net keeps the MoE layers


def test_timm_generic_forward_intermediates():
    model = timm.create_model(TIMM_NAME, **TIMM_KWARGS).eval()
    x = _timm_input(model)
    final, inter = model.forward_intermediates(x)
    assert len(inter) == 6 and all(t.shape == (2, 192, 7, 7) for t in inter)
    torch.testing.assert_close(final, model.forward_features(x))
    only = model.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
    torch.testing.assert_close(only, [inter[1], inter[3]])
    pruned = model.prune_intermediate_layers(indices=[3])  # drops blocks 4, 5 (an MoE layer) and the head
    assert pruned == [3] and len(model.blocks) == 4
    torch.testing.assert_close(model.forward_intermediates(x, indices=[3], intermediates_only=True)[0], inter[3])


def test_timm_generic_grad_checkpointing_gives_the_same_gradients():
    model = timm.create_model(TIMM_NAME, balance_weight=1.0, **TIMM_KWARGS).train()
    x = _timm_input(model)
    grads = {}
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        assert model.grad_checkpointing is enable
        model.zero_grad()
        loss = model(x).square().mean() + moe_aux_loss(model)  # the aux loss keeps its graph under checkpointing
        loss.backward()
        grads[enable] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, msg=name)


@pytest.mark.parametrize("kwargs", [
    TIMM_KWARGS, dict(moe_layers="last-2", dispatch="loop", capacity_factor=0.5),
    dict(moe_layers="last-2", dispatch="einsum", top_k=2, capacity_factor=1.0, priority="gate"),
    dict(moe_layers="last-2", routing="image", shared_expert="gated"),
], ids=["grouped", "loop", "einsum", "image"])
def test_meta_device_creation_and_forward(kwargs):
    with torch.device("meta"):
        model = timm.create_model(TIMM_NAME, **kwargs)
    assert all(p.is_meta for p in model.parameters())
    out = model(torch.randn(3, 1, 28, 28, device="meta"))
    assert out.shape == (3, 10) and out.is_meta and out.dtype == torch.float32
    assert moe_aux_loss(model).is_meta
    # init_empty_weights-style loading: materialise, load real weights, compute what the source computes
    source = timm.create_model(TIMM_NAME, **kwargs).eval()
    model.to_empty(device="cpu").load_state_dict(source.state_dict())
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(model.eval()(x), source(x))


def test_timm_device_and_dtype_arguments_reach_the_moe_layers():
    meta = timm.create_model(TIMM_NAME, device="meta", **TIMM_KWARGS)
    assert {p.device.type for p in meta.parameters()} == {"meta"}
    assert meta(torch.randn(1, 1, 28, 28, device="meta")).shape == (1, 10)
    bf16 = timm.create_model(TIMM_NAME, dtype=torch.bfloat16, **TIMM_KWARGS)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert "device" not in bf16.moe_kwargs and "dtype" not in bf16.moe_kwargs
    vit = VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=2, num_heads=2,
                            mlp_layer=MoEMlp, device="meta")  # timm hands device= to its mlp_layer
    assert {p.device.type for p in vit.parameters()} == {"meta"}
