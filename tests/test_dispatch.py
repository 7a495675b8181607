"""The three dispatch paths compute the same function and the same gradients."""
import pytest
import torch

from workbench.moe import MoEMlp


def _run(dispatch, state, x, **kwargs):
    layer = MoEMlp(x.shape[-1], 24, dispatch=dispatch, **kwargs)
    layer.load_state_dict(state)
    x = x.clone().requires_grad_(True)
    y = layer(x)
    weights = torch.linspace(-1, 1, y.numel()).view_as(y)
    (y * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads, layer


CASES = [
    dict(num_experts=4, top_k=1),
    dict(num_experts=4, top_k=2),
    dict(num_experts=8, top_k=2, renormalize=True),
    dict(num_experts=5, top_k=1, capacity_factor=0.5),
    dict(num_experts=4, top_k=2, capacity_factor=0.75, priority="gate"),
    dict(num_experts=3, top_k=1, routing="image"),
    dict(num_experts=4, top_k=2, routing="image", image_pool="cls", capacity_factor=0.5),
    dict(num_experts=4, top_k=1, shared_expert="add"),
    dict(num_experts=4, top_k=2, shared_expert="gated", shared_hidden=12),
    dict(num_experts=4, top_k=2, bias=False),  # bias-free experts (and shared expert)
    dict(num_experts=5, top_k=1, bias=False, capacity_factor=0.5, shared_expert="add"),
    dict(num_experts=3, top_k=2, bias=False, routing="image"),
]


@pytest.mark.parametrize("kwargs", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("seed", [0, 1])
def test_paths_agree(kwargs, seed):
    torch.manual_seed(seed)
    batch, tokens, dim = torch.randint(1, 5, ()).item(), torch.randint(2, 9, ()).item(), 16
    reference = MoEMlp(dim, 24, **kwargs)
    state = reference.state_dict()
    x = torch.randn(batch, tokens, dim)
    results = {d: _run(d, state, x, **kwargs) for d in ("grouped", "loop", "einsum")}
    y0, gx0, g0, layer0 = results["loop"]
    for name in ("grouped", "einsum"):
        y, gx, g, layer = results[name]
        torch.testing.assert_close(y, y0, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gx, gx0, atol=1e-5, rtol=1e-5)
        assert g.keys() == g0.keys()
        for key in g0:
            torch.testing.assert_close(g[key], g0[key], atol=1e-5, rtol=1e-5, msg=f"grad of {key} ({name})")
        torch.testing.assert_close(layer.last_load, layer0.last_load)


@pytest.mark.parametrize("dispatch", ["grouped", "loop", "einsum"])
def test_bias_free_experts_compute_the_bias_free_ffn(dispatch):
    torch.manual_seed(0)
    layer = MoEMlp(16, 24, num_experts=4, top_k=2, bias=False, dispatch=dispatch)
    assert layer.b1 is None and layer.b2 is None
    layer.capture_routing = True
    x = torch.randn(2, 5, 16)
    y = layer(x).detach()
    r = layer.last_routing
    flat = x.reshape(-1, 16)
    expected = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for j in range(2):
            e = r["experts"][t, j]
            expected[t] += r["gates"][t, j] * (layer.act(flat[t] @ layer.w1[e]) @ layer.w2[e])
    torch.testing.assert_close(y, expected.view(2, 5, 16).detach(), atol=1e-6, rtol=1e-5)


def test_empty_experts_are_fine():
    torch.manual_seed(0)
    layer = MoEMlp(16, 24, num_experts=8, top_k=1)
    with torch.no_grad():  # route everything to expert 3
        layer.router.weight.zero_()
        layer.router.weight[3] = 1.0
    state = layer.state_dict()
    x = torch.rand(2, 5, 16) + 0.1
    outs = {d: _run(d, state, x) for d in ("grouped", "loop", "einsum")}
    assert outs["grouped"][3].last_load.tolist() == [0, 0, 0, 10, 0, 0, 0, 0]
    for d in ("grouped", "einsum"):
        torch.testing.assert_close(outs[d][0], outs["loop"][0], atol=1e-5, rtol=1e-5)
        assert outs[d][2]["w1"][[0, 1, 2, 4, 5, 6, 7]].abs().max() == 0


def test_capacity_drops_are_counted_and_pass_through():
    torch.manual_seed(0)
    layer = MoEMlp(16, 24, num_experts=4, top_k=1, capacity_factor=0.5)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0] = 1.0
    x = torch.rand(1, 8, 16) + 0.1  # all 8 tokens want expert 0; capacity = ceil(0.5*8/4) = 1
    y = layer(x)
    assert layer.last_drop_rate.item() == pytest.approx(7 / 8)
    assert layer.last_load.tolist() == [1, 0, 0, 0]
    assert torch.count_nonzero(y.abs().sum(-1)).item() == 1  # dropped tokens add nothing (the residual carries them)


def test_dropless_drops_nothing():
    layer = MoEMlp(16, 24, num_experts=4, top_k=2)
    layer(torch.randn(3, 7, 16))
    assert layer.last_drop_rate.item() == 0.0
    assert layer.last_load.sum().item() == 3 * 7 * 2
