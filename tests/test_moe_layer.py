import pytest
import torch
from functools import partial
from timm.models.vision_transformer import VisionTransformer

from workbench.moe import MoEMlp, moe_aux_loss, moe_aux_terms, moe_modules, set_capture


def test_token_routing_shapes():
    layer = MoEMlp(16, 32, num_experts=4, top_k=2)
    layer.capture_routing = True
    y = layer(torch.randn(3, 5, 16))
    assert y.shape == (3, 5, 16)
    r = layer.last_routing
    assert r["probs"].shape == (15, 4) and r["experts"].shape == (15, 2) and r["gates"].shape == (15, 2)


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_image_routing_one_choice_per_image(pool):
    layer = MoEMlp(16, 32, num_experts=4, top_k=1, routing="image", image_pool=pool, dispatch="loop")
    layer.capture_routing = True
    x = torch.randn(3, 5, 16)
    y = layer(x)
    assert y.shape == (3, 5, 16)
    assert layer.last_routing["probs"].shape == (3, 4)
    assert layer.last_load.sum().item() == 3  # loads count routing units (images)
    # each token's output equals that image's expert applied to it
    for b in range(3):
        e = layer.last_routing["experts"][b, 0]
        g = layer.last_routing["gates"][b, 0]
        h = layer.act(x[b] @ layer.w1[e] + layer.b1[e]) @ layer.w2[e] + layer.b2[e]
        torch.testing.assert_close(y[b], g * h)


def test_image_pool_changes_routing_input():
    torch.manual_seed(0)
    a = MoEMlp(16, 32, num_experts=4, routing="image", image_pool="mean")
    b = MoEMlp(16, 32, num_experts=4, routing="image", image_pool="cls")
    b.load_state_dict(a.state_dict())
    a.capture_routing = b.capture_routing = True
    x = torch.randn(6, 5, 16)
    a(x), b(x)
    assert not torch.equal(a.last_routing["probs"], b.last_routing["probs"])
    probs = torch.softmax(x[:, 0] @ b.router.weight.t(), -1)
    torch.testing.assert_close(b.last_routing["probs"], probs)


def test_capture_off_by_default_and_overwritten():
    layer = MoEMlp(16, 32, num_experts=4)
    layer(torch.randn(2, 3, 16))
    assert layer.last_routing is None
    layer.capture_routing = True
    layer(torch.randn(2, 3, 16))
    first = layer.last_routing["probs"]
    layer(torch.randn(4, 3, 16))
    assert layer.last_routing["probs"].shape == (12, 4) and first.shape == (6, 4)


def test_shared_expert_add_and_gated():
    x = torch.randn(2, 3, 16)
    routed = MoEMlp(16, 32, num_experts=4)
    add = MoEMlp(16, 32, num_experts=4, shared_expert="add", shared_hidden=8)
    add.load_state_dict({**routed.state_dict(), **{k: v for k, v in add.state_dict().items() if "shared" in k}})
    torch.testing.assert_close(add(x), routed(x) + add.shared(x))
    gated = MoEMlp(16, 32, num_experts=4, shared_expert="gated")
    gated.load_state_dict({**routed.state_dict(), **{k: v for k, v in gated.state_dict().items() if "shared" in k}})
    torch.testing.assert_close(gated(x), routed(x) + 0.5 * gated.shared(x))  # gate starts at sigmoid(0)
    assert add.activated_hidden() == 32 + 8


def test_aux_losses_weighted_and_summed_over_model():
    mlp = partial(MoEMlp, num_experts=4, top_k=2, balance_weight=0.1, importance_weight=0.2, load_weight=0.3,
                  zloss_weight=0.4)
    vit = VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=2, num_heads=2,
                            mlp_layer=mlp)
    out = vit(torch.randn(2, 1, 8, 8))
    layers = moe_modules(vit)
    assert sorted(layers) == [0, 1]
    expected = sum(0.1 * l.aux_terms["balance"] + 0.2 * l.aux_terms["importance"] + 0.3 * l.aux_terms["load"]
                   + 0.4 * l.aux_terms["zloss"] for l in layers.values())
    total = moe_aux_loss(vit)
    torch.testing.assert_close(total.detach(), expected)
    (out.sum() + total).backward()
    assert layers[0].router.weight.grad.abs().sum() > 0
    assert set(moe_aux_terms(vit)) == {"balance", "importance", "load", "zloss"}


def test_set_capture_reaches_every_layer():
    vit = VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=2, num_heads=2,
                            mlp_layer=partial(MoEMlp, num_experts=2))
    set_capture(vit)
    vit(torch.randn(1, 1, 8, 8))
    assert all(l.last_routing is not None for l in moe_modules(vit).values())
    set_capture(vit, False)
    assert all(l.last_routing is None for l in moe_modules(vit).values())


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_experts=4, top_k=5), "top_k"),
    (dict(top_k=0), "top_k"),
    (dict(num_experts=0), "num_experts"),
    (dict(routing="pixel"), "routing"),
    (dict(image_pool="max"), "image_pool"),
    (dict(capacity_factor=0), "capacity_factor"),
    (dict(capacity_factor=-1.5), "capacity_factor"),
    (dict(shared_expert="always"), "shared_expert"),
    (dict(dispatch="fast"), "dispatch"),
    (dict(priority="random"), "priority"),
    (dict(balance_weight=-1), "balance_weight"),
    (dict(routing="image", image_pool="cls", num_prefix_tokens=0), "image_pool"),
])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MoEMlp(16, 32, **kwargs)


def test_accepts_unknown_timm_kwargs():
    MoEMlp(16, 32, num_experts=2, some_future_timm_arg=True)


def test_bf16_autocast_grouped():
    layer = MoEMlp(16, 32, num_experts=4, top_k=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(2, 3, 16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
