import pytest
import timm
import torch

from workbench.analysis.flops import analytic_macs, profile


def test_vit_small_matches_published_gmacs():
    prof = profile(timm.create_model("vit_small_patch16_224"))
    assert prof.macs / 1e9 == pytest.approx(4.6, rel=0.02)  # timm's published 4.6 GMACs
    assert prof.params == 22050664


@pytest.mark.parametrize("kwargs", [
    dict(moe_layers="none"), dict(moe_layers="last-2"), dict(moe_layers="all", top_k=2),
    dict(moe_layers="every-2", shared_expert="add"), dict(moe_layers="last-2", shared_expert="gated", top_k=2),
    dict(moe_layers="last-2", routing="image"), dict(moe_layers="last-1", dispatch="einsum", top_k=2),
])
def test_profile_agrees_with_analytic_count(kwargs):
    model = timm.create_model("vimoe_tiny_patch4_28", **kwargs)
    prof = profile(model)
    # fvcore also counts every LayerNorm (5 per element with affine; 2 per block + the final one = 13), the closed
    # form does not; GELU and other elementwise ops neither counts.  With the norms added they agree exactly, so a
    # miscounted router, shared expert or gate shows.
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 13
    assert prof.macs == analytic_macs(model) + len(norms) * 50 * 192 * 5


def test_profile_equals_a_count_by_hand():
    """vimoe_tiny_patch4_28 (d=192, 6 blocks, 3 heads, 7x7 patches + CLS = 50 tokens, FFN width 768), MoE in blocks
    4 and 5 with 8 experts, top-2, a gated shared expert of width 768; per image, in MACs."""
    model = timm.create_model("vimoe_tiny_patch4_28", moe_layers="last-2", num_experts=8, top_k=2,
                              shared_expert="gated")
    T, d, h, E = 50, 192, 768, 8
    patch_embed = 49 * (1 * 4 * 4) * d  # 150,528
    attention = T * d * 3 * d + T * d * d + 2 * 3 * T * T * (d // 3)  # qkv + proj + QK^T + AV: 8,332,800
    ffn = T * (d * h + h * d)  # 14,745,600
    router = T * d * E  # 76,800
    experts = 2 * T * (d * h + h * d)  # every token to 2 experts (dropless): 29,491,200
    shared = T * (d * h + h * d) + T * d  # the shared expert and its gate: 14,755,200
    norms = 13 * T * d * 5  # 624,000
    head = d * 10
    total = patch_embed + 6 * attention + 4 * ffn + 2 * (router + experts + shared) + norms + head
    assert total == 198_402_048
    prof = profile(model)
    assert prof.macs == total
    rows = prof.blocks.set_index("block")
    assert rows.loc[4, "router_macs"] == router and rows.loc[4, "shared_macs"] == shared
    assert rows.loc[5, "ffn_macs"] == experts and rows.loc[0, "macs"] == attention + ffn + 2 * T * d * 5


@pytest.mark.parametrize("training", [True, False])
def test_profile_keeps_the_callers_mode(training):
    model = timm.create_model("vimoe_tiny_patch4_28", moe_layers="last-2").train(training)
    model.blocks[0].train(not training)  # a mixed-mode model (e.g. a frozen part) keeps its mixture
    before = {name: m.training for name, m in model.named_modules()}
    profile(model)
    assert {name: m.training for name, m in model.named_modules()} == before


def test_moe_costs_top_k_experts_not_all_experts():
    dense = profile(timm.create_model("vimoe_tiny_patch4_28", moe_layers="none"))
    top1 = profile(timm.create_model("vimoe_tiny_patch4_28", moe_layers="all", num_experts=8, top_k=1))
    top2 = profile(timm.create_model("vimoe_tiny_patch4_28", moe_layers="all", num_experts=8, top_k=2))
    assert top1.dense_macs == pytest.approx(dense.macs, rel=1e-6)
    assert top1.macs == pytest.approx(dense.macs, rel=0.01)  # + router only
    ffn = top1.blocks["ffn_macs"].sum()
    assert top2.blocks["ffn_macs"].sum() == pytest.approx(2 * ffn, rel=1e-6)
    assert top1.params > 5 * dense.params and top1.dense_params == dense.params
    assert top1.active_params < 1.01 * dense.params


def test_capacity_drops_reduce_activated_macs():
    model = timm.create_model("vimoe_tiny_patch4_28", moe_layers="last-1", capacity_factor=0.25)
    x = torch.randn(8, 1, 28, 28)
    prof = profile(model, x)
    layer = model.blocks[5].mlp
    assert layer.last_drop_rate > 0
    row = prof.blocks.set_index("block").loc[5]
    assert row["ffn_macs"] < row["dense_macs"] - row["attn_macs"]


def test_profile_cli(capsys):
    from workbench.cli import main

    assert main(["profile", "--moe-layers", "last-2", "--shared-expert", "add"]) == 0
    out = capsys.readouterr().out
    assert "GMACs" in out and "dense-equivalent" in out and "moe" in out
