import pytest
import timm
import torch

import workbench
from workbench.analysis.densify import densify
from workbench.analysis.flops import profile
from workbench.moe import moe_modules


def _upcycled(**kw):
    dense = timm.create_model("vimoe_tiny_patch4_28", moe_layers="none").eval()
    return dense, workbench.upcycle(dense, "last-2", num_experts=4, top_k=1, renormalize=True, **kw).eval()


@pytest.mark.parametrize("method", ["top", "merge"])
def test_identical_experts_densify_exactly(method):
    dense, moe = _upcycled()
    x = torch.randn(4, 1, 28, 28)
    moe(x)
    small = densify(moe, [4, 5], method)
    assert (small(x) - moe(x)).abs().max() < 1e-5
    assert (small(x) - dense(x)).abs().max() < 1e-5
    assert moe_modules(small) == {} and len(moe_modules(moe)) == 2  # the original is untouched
    p_small, p_moe = profile(small), profile(moe)
    assert p_small.params == p_moe.dense_params < p_moe.params


def test_shared_expert_is_kept_alongside_the_routed_one():
    _, moe = _upcycled(shared_expert="add")  # shared = copy of the FFN, so the block computes 2 * FFN
    x = torch.randn(2, 1, 28, 28)
    moe(x)
    small = densify(moe, [5], "top")
    assert small.blocks[5].mlp.fc1.out_features == 2 * 768
    assert (small(x) - moe(x)).abs().max() < 1e-5
    only_shared = densify(moe, [4, 5], "shared")
    assert only_shared.blocks[5].mlp.fc1.out_features == 768
    assert profile(only_shared).params < profile(small).params


def test_top_keeps_the_most_used_expert():
    _, moe = _upcycled()
    layer = moe.blocks[5].mlp
    with torch.no_grad():
        layer.w1[2] += 1.0
    from workbench.analysis.densify import dense_from_moe

    mlp = dense_from_moe(layer, "top", usage=torch.tensor([1.0, 0.0, 9.0, 0.0]))
    torch.testing.assert_close(mlp.fc1.weight, layer.w1[2].t())


def test_densify_errors():
    _, moe = _upcycled()
    moe(torch.randn(1, 1, 28, 28))
    with pytest.raises(ValueError, match="not MoE layers"):
        densify(moe, [0], "top")
    with pytest.raises(ValueError, match="method='average'"):
        densify(moe, [5], "average")
    with pytest.raises(ValueError, match="needs a shared expert"):
        densify(moe, [5], "shared")


def test_top2_merge_scales_by_the_sum_of_kept_gates():
    """An upcycled renormalised top-2 layer (identical experts, gates summing to 1) densifies exactly; an
    unnormalised top-2 layer is scaled by the mean of g1 + g2, not by the first gate alone."""
    from workbench.analysis.routing import collect_routing
    from workbench.data.classification import synthetic, TensorData

    images, labels = synthetic(64, 10, 28, 1, seed=0)
    data = TensorData(images, labels, (0.5,), (0.25,), 10)
    dense = timm.create_model("vimoe_tiny_patch4_28", moe_layers="none").eval()
    x = data.normalise(images[:8])
    renorm = workbench.upcycle(dense, "last-2", num_experts=4, top_k=2, renormalize=True).eval()
    stats = collect_routing(renorm, data, progress=False)
    assert stats.layers[5].mean_gate_sum == pytest.approx(1.0)
    assert (densify(renorm, [4, 5], "merge", stats=stats)(x) - dense(x)).abs().max() < 1e-4
    raw = workbench.upcycle(dense, [5], num_experts=4, top_k=2).eval()
    stats = collect_routing(raw, data, progress=False)
    s = stats.layers[5]
    assert s.mean_gate < s.mean_gate_sum <= 1.0
    merged = densify(raw, [5], "merge", stats=stats).blocks[5].mlp
    torch.testing.assert_close(merged.fc2.weight, raw.blocks[5].mlp.w2[0].t() * s.mean_gate_sum)
