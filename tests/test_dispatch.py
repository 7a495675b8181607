"""The three dispatch paths compute the same function and the same gradients."""
import pytest
import torch

from workbench.moe import MoEMlp
from workbench.moe import dispatch
from workbench.moe.dispatch import SortedAssignments


def _state(layer):
    """The layer's weights with random biases (they start at zero, which would hide a bias taken from the wrong
    expert)."""
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name in ("b1", "b2"):
                p.normal_(0.0, 0.5)
    return layer.state_dict()


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
    dict(num_experts=6, top_k=3, capacity_factor=1.0),  # k > 2: three rows summed per token
]


@pytest.mark.parametrize("kwargs", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("seed", [0, 1])
def test_paths_agree(kwargs, seed):
    torch.manual_seed(seed)
    batch, tokens, dim = torch.randint(1, 5, ()).item(), torch.randint(2, 9, ()).item(), 16
    state = _state(MoEMlp(dim, 24, **kwargs))
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


def _pair(kwargs, tokens=(4, 9), dim=16, seed=0):
    torch.manual_seed(seed)
    state = _state(MoEMlp(dim, 24, **kwargs))
    layers = {}
    for d in ("grouped", "loop"):
        layers[d] = MoEMlp(dim, 24, dispatch=d, **kwargs)
        layers[d].load_state_dict(state)
    return layers, torch.randn(*tokens, dim)


@pytest.mark.parametrize("kwargs", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_inference_path_equals_loop(kwargs):
    layers, x = _pair(kwargs)
    layers["grouped"].padded_max_rows = 0  # the sorted path (the padded one: test_padded_inference_...)
    with torch.no_grad():
        y, y0 = layers["grouped"](x), layers["loop"](x)
    torch.testing.assert_close(y, y0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, layers["grouped"](x).detach(), atol=0, rtol=0)  # the same numbers as training


@pytest.mark.parametrize("kwargs", [dict(num_experts=8, top_k=1), dict(num_experts=8, top_k=2, capacity_factor=0.6),
                                    dict(num_experts=8, top_k=2, routing="image", shared_expert="add")])
def test_many_tokens_agree_with_loop_forward_and_backward(kwargs):
    """Hundreds of rows per expert (the sizes the benchmark runs), drops included: outputs and every gradient."""
    layers, x = _pair(kwargs, tokens=(16, 50), dim=32)
    results = {}
    for d, layer in layers.items():
        xg = x.clone().requires_grad_(True)
        y = layer(xg)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results[d] = (y.detach(), xg.grad, {n: p.grad for n, p in layer.named_parameters() if p.grad is not None})
    (y, gx, g), (y0, gx0, g0) = results["grouped"], results["loop"]
    torch.testing.assert_close(y, y0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, gx0, atol=1e-5, rtol=1e-5)
    assert g.keys() == g0.keys()
    for name in g0:
        torch.testing.assert_close(g[name], g0[name], atol=1e-5, rtol=1e-4, msg=f"grad of {name}")


def test_inference_path_only_without_grad(monkeypatch):
    calls = []
    real = dispatch._sorted_experts_inference
    monkeypatch.setattr(dispatch, "_sorted_experts_inference", lambda *a: calls.append(1) or real(*a))
    layer = MoEMlp(16, 24, num_experts=4, top_k=2)
    layer.padded_max_rows = 0  # the sorted path at every size
    x = torch.randn(2, 5, 16)
    y = layer(x)
    assert calls == [] and y.requires_grad
    with torch.no_grad():
        y = layer(x)
    assert calls == [1] and not y.requires_grad
    layer.eval()  # eval mode alone keeps autograd (and the training path): gradients still flow
    assert layer(x).requires_grad and calls == [1]


def test_sorted_assignments_gather_and_scatter_are_adjoint():
    torch.manual_seed(0)
    experts = torch.stack([torch.randperm(5)[:2] for _ in range(7)])  # 7 tokens, top-2 of 5 experts
    plan = SortedAssignments.of(experts, 5)
    assert plan.counts == torch.bincount(experts.reshape(-1), minlength=5).tolist()
    assert (experts.reshape(-1)[plan.order].diff() >= 0).all()  # sorted by expert
    x, rows = torch.randn(7, 3), torch.randn(14, 3)
    torch.testing.assert_close((plan.gather(x) * rows).sum(), (x * plan.scatter(rows)).sum())
    gates = torch.rand(7, 2)
    torch.testing.assert_close(plan.unsort_gates(plan.sorted_gates(gates).squeeze(1)), gates)


def test_dropout_inside_experts_takes_the_grouped_matmul_path(monkeypatch):
    monkeypatch.setattr(dispatch._SortedExperts, "apply", lambda *a: pytest.fail("fused path with dropout"))
    layer = MoEMlp(16, 24, num_experts=4, top_k=2, drop=0.5).train()
    layer(torch.randn(2, 5, 16)).sum().backward()
    assert layer.w1.grad is not None


def _relative_close(actual, expected, tol, what):
    """|actual - expected| <= tol * max|expected|, elementwise: bf16 error is relative to the tensor's scale."""
    scale = expected.float().abs().max().clamp(min=1e-6)
    err = (actual.float() - expected.float()).abs().max()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} x max|expected| {scale:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("kwargs", [dict(num_experts=8, top_k=1), dict(num_experts=8, top_k=2, capacity_factor=0.75),
                                    dict(num_experts=4, top_k=2, bias=False, shared_expert="add")])
def test_cuda_grouped_mm_matches_loop_in_bf16(kwargs):
    """The CUDA path (two ``torch._grouped_mm`` kernels under bf16 autocast) against the loop path, same weights and
    routing, outputs and gradients.  Tolerance 3e-2 of the tensor's largest magnitude: bf16 keeps 8 significant
    bits (a rounding costs up to 2^-9 = 0.2% of the value), and the two paths round at different places (the first
    bias inside the grouped matmul, the second after the combine, versus both inside each addmm), a handful of
    roundings apart on the way to each output; the gradients are sums over ~100 tokens of such values,
    accumulated in fp32 by the matmuls and rounded once."""
    if not dispatch.HAS_GROUPED_MM:
        pytest.skip("this torch has no torch._grouped_mm")
    layers, x = _pair(kwargs, tokens=(4, 50), dim=64)
    x = x.cuda()
    results = {}
    for d, layer in layers.items():
        layer.cuda()
        xg = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(xg)
        (y.float() * torch.linspace(-1, 1, y.numel(), device="cuda").view_as(y)).sum().backward()
        results[d] = (y.detach(), xg.grad, {n: p.grad for n, p in layer.named_parameters() if p.grad is not None})
    (y, gx, g), (y0, gx0, g0) = results["grouped"], results["loop"]
    assert y.dtype == y0.dtype == torch.bfloat16
    _relative_close(y, y0, 3e-2, "output")
    _relative_close(gx, gx0, 3e-2, "grad of x")
    assert g.keys() == g0.keys()
    for name in g0:
        _relative_close(g[name], g0[name], 3e-2, f"grad of {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("kwargs", [dict(top_k=1), dict(top_k=2), dict(top_k=2, capacity_factor=0.75),
                                    dict(top_k=2, shared_expert="add"), dict(router="experts_choose"),
                                    dict(router="soft"), dict(top_k=2, dispatch="loop"),
                                    dict(top_k=2, dispatch="einsum")])
def test_every_moe_path_keeps_bf16_under_cuda_autocast(kwargs):
    """Under CUDA autocast every router and dispatch path hands the next block a bf16 activation, as timm's Mlp
    does (CUDA autocast runs ``sum`` in float32: a top-2 combine once returned float32 there)."""
    layer = MoEMlp(64, 128, num_experts=4, **kwargs).cuda()
    x = torch.randn(2, 50, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16, f"{kwargs}: {y.dtype}"


PADDED_CASES = [
    dict(num_experts=8, top_k=1),
    dict(num_experts=8, top_k=2),
    dict(num_experts=8, top_k=2, renormalize=True),
    dict(num_experts=8, top_k=1, renormalize=True, shared_expert="add"),
    dict(num_experts=8, top_k=2, shared_expert="gated", shared_hidden=12),
    dict(num_experts=4, top_k=1, capacity_factor=0.5),
    dict(num_experts=3, top_k=2, routing="image"),
    dict(num_experts=4, top_k=1, bias=False),
]


@pytest.mark.parametrize("kwargs", PADDED_CASES)
@pytest.mark.parametrize("batch", [1, 8])
def test_padded_inference_equals_the_sorted_path(monkeypatch, kwargs, batch):
    """Few tokens per expert under no_grad take the padded batched matmul; its outputs equal the sorted path's to
    fp32 rounding, and a training forward (autograd on) never takes it."""
    torch.manual_seed(batch)
    layer = MoEMlp(16, 24, **kwargs).eval()
    _state(layer)
    x = torch.randn(batch, 50, 16)
    calls = []
    real = dispatch.padded_experts_inference
    monkeypatch.setattr(dispatch, "padded_experts_inference", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        layer.padded_max_rows = 0
        sorted_y = layer(x)
        assert calls == []
        layer.padded_max_rows = 10**6  # every size (batch 8 is over the default 16 rows)
        padded_y = layer(x)
        assert calls == [1]
    torch.testing.assert_close(padded_y, sorted_y)
    y = layer(x)  # autograd on: the training path, bit for bit the same as before
    assert calls == [1] and y.requires_grad
    layer.padded_max_rows = 0
    torch.testing.assert_close(y.detach(), sorted_y, rtol=0, atol=0)


def test_padded_threshold_counts_rows_per_expert(monkeypatch):
    calls = []
    real = dispatch.padded_experts_inference
    monkeypatch.setattr(dispatch, "padded_experts_inference", lambda *a: calls.append(1) or real(*a))
    layer = MoEMlp(16, 24, num_experts=4, top_k=2)
    layer.padded_max_rows = 10
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor([1.0, 0.5, -1.0, -1.0]).unsqueeze(1).expand(4, 16))
        # positive inputs: top-2 takes experts 0 and 1 for every token
        layer(torch.rand(1, 10, 16))  # 10 rows in each of 2 experts, a buffer of 4 x 10 = 2 x 20 rows: padded
        layer(torch.rand(1, 11, 16))  # 11 rows: sorted
        layer(torch.rand(2, 5, 16))  # 10 rows each again: padded
        image = MoEMlp(16, 24, num_experts=8, top_k=1, routing="image")
        image.padded_max_rows = 100
        image(torch.randn(1, 50, 16))  # 6.25 rows per expert, but all 50 in one: padding would run 8 x 50 rows
    assert calls == [1, 1]
    assert dispatch.PADDED_MAX_ROWS == 16 and MoEMlp.padded_max_rows is None


@pytest.mark.parametrize("k", [1, 2])
def test_experts_on_sorted_rows_are_the_routed_ffn_without_its_gather_gates_and_return(k):
    """``bench split``'s innermost piece computes what the loop path's experts compute: scattered back with the gates
    it is the loop's output, and its gradients (weights and rows) are the loop's."""
    torch.manual_seed(k)
    layer = MoEMlp(12, 20, num_experts=4, top_k=k)
    x = torch.randn(30, 12)
    with torch.no_grad():
        _, _, experts, gates = layer.router(x)
    plan = SortedAssignments.of(experts, 4)
    weights = (layer.w1, layer.b1, layer.w2, layer.b2)
    xs = plan.gather(x).requires_grad_(True)
    rows = dispatch.experts_on_sorted_rows(xs, *weights, plan, layer.act)
    y = plan.scatter(rows * plan.sorted_gates(gates))
    xr = x.clone().requires_grad_(True)
    ref = dispatch.dispatch_loop(xr, experts, gates, *weights, layer.act, layer.drop)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(ref)
    mine = torch.autograd.grad(y, [xs, *weights], g)
    theirs = torch.autograd.grad(ref, [xr, *weights], g)
    torch.testing.assert_close(plan.scatter(mine[0]), theirs[0])  # each token: the sum over its k rows
    for a, b in zip(mine[1:], theirs[1:]):
        torch.testing.assert_close(a, b)
