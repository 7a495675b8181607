import pytest
import timm
import torch

from workbench.flops import analytic_macs, profile


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
    # fvcore also counts norms and GELU, the closed form does not: they agree within 1%
    assert prof.macs == pytest.approx(analytic_macs(model), rel=0.01)


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
