import math

import pytest
import timm
import torch

from workbench.data.classification import TensorData, synthetic
from workbench.analysis.routing import LayerStats, RoutingStats, collect_routing, run_with_routing
from workbench.analysis.specialisation import class_metrics, layer_report, layers_to_densify, nmi, null_metrics


def _model(**kw):
    return timm.create_model("vimoe_tiny_patch4_28", **{"moe_layers": "last-2", "num_experts": 4, **kw}).eval()


def test_run_with_routing_shapes_and_names():
    model = _model(top_k=2)
    logits, cache = run_with_routing(model, torch.randn(3, 1, 28, 28))
    assert logits.shape == (3, 10) and cache.layers() == [4, 5]
    r = cache[5]
    assert r.probs.shape == (3, 7, 7, 4) and r.experts.shape == (3, 7, 7, 2) and r.gates.shape == (3, 7, 7, 2)
    assert r.prefix_probs.shape == (3, 1, 4)
    torch.testing.assert_close(r.probs.sum(-1), torch.ones(3, 7, 7))
    assert model.blocks[5].mlp.capture_routing is False and model.blocks[5].mlp.last_routing is None
    torch.testing.assert_close(r.expert_load(), r.expert_load() / r.expert_load().sum(-1, keepdim=True))


def test_patch_grid_matches_token_order():
    """Patch (row, col) in the cache is token 1 + row * 7 + col of the layer's own record."""
    model = _model()
    layer = model.blocks[4].mlp
    layer.capture_routing = True
    x = torch.randn(2, 1, 28, 28)
    model(x)
    raw = layer.last_routing["experts"].view(2, 50, 1)
    layer.capture_routing = False
    _, cache = run_with_routing(model, x)
    assert torch.equal(cache[4].experts[1, 3, 5], raw[1, 1 + 3 * 7 + 5])


def test_image_routing_cache():
    _, cache = run_with_routing(_model(routing="image"), torch.randn(3, 1, 28, 28))
    assert cache[4].routing == "image" and cache[4].probs.shape == (3, 4) and cache[4].top1().shape == (3,)


def _data(n=60):
    images, labels = synthetic(n, 10, 28, 1, seed=3)
    return TensorData(images, labels, (0.5,), (0.25,), 10)


def test_collect_routing_equals_brute_force():
    model, data = _model(), _data()
    stats = collect_routing(model, data, batch_size=16, progress=False)
    x = data.normalise(data.images)
    _, cache = run_with_routing(model, x)
    for b in (4, 5):
        top1 = cache[b].top1().reshape(len(data), -1)
        counts = torch.zeros(10, 4)
        for img, label in zip(top1, data.labels):
            counts[label] += torch.bincount(img, minlength=4).float()
        torch.testing.assert_close(stats.layers[b].class_expert, counts)
        torch.testing.assert_close(stats.layers[b].position_expert.sum(1), torch.full((49,), float(len(data))))
        assert stats.layers[b].image_hist.shape == (len(data), 4)
    assert stats.predictions.shape == (len(data),)


def test_metrics_perfect_specialisation():
    labels = torch.arange(8).repeat(10)
    hist = torch.nn.functional.one_hot(labels, 8).float()
    table = torch.nn.functional.one_hot(labels, 8).float().t() @ hist
    m = class_metrics(table, hist, labels)
    assert m["entropy"] == pytest.approx(0.0, abs=1e-6) and m["purity"] == pytest.approx(1.0)
    assert m["nmi"] == pytest.approx(1.0) and m["consistency"] == pytest.approx(1.0)


def test_metrics_uniform_random_routing():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (5000,), generator=g)
    experts = torch.randint(0, 8, (5000, 49), generator=g)
    hist = torch.nn.functional.one_hot(experts, 8).float().mean(1)
    table = torch.nn.functional.one_hot(labels, 10).float().t() @ hist
    m = class_metrics(table, hist, labels)
    assert m["entropy"] > 0.99 and m["nmi"] < 0.01 and m["purity"] < 0.2
    null = null_metrics(hist, labels, 10, repeats=5)
    assert abs(m["nmi"] - null["nmi"][0]) < 5 * null["nmi"][1] + 1e-3


def test_metrics_collapsed_routing():
    labels = torch.arange(10).repeat(20)
    hist = torch.zeros(200, 8)
    hist[:, 3] = 1
    table = torch.nn.functional.one_hot(labels, 10).float().t() @ hist
    m = class_metrics(table, hist, labels)
    assert m["entropy"] == pytest.approx(0.0, abs=1e-6) and m["purity"] == pytest.approx(1.0)
    assert m["nmi"] == 0.0  # one expert for everything says nothing about the class
    assert nmi(torch.tensor([[5.0, 0.0], [0.0, 5.0]])) == pytest.approx(1.0)


def _stats(specialised_block_hist, random_block_hist, labels):
    def layer(hist):
        table = torch.nn.functional.one_hot(labels, 10).float().t() @ hist
        return LayerStats(8, "token", table * 49, None, hist, hist.sum(0) * 49, 0.0, 0.5)
    return RoutingStats({2: layer(random_block_hist), 5: layer(specialised_block_hist)}, labels, labels, 10, (7, 7))


def test_report_ranks_and_recommends():
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 10, (2000,), generator=g)
    spec = torch.nn.functional.one_hot(labels % 8, 8).float()
    rand = torch.nn.functional.one_hot(torch.randint(0, 8, (2000,), generator=g), 8).float()
    report = layer_report(_stats(spec, rand, labels), repeats=5)
    assert report["block"].tolist() == [5, 2] and "recommend" not in report  # no calls without a baseline
    assert layers_to_densify(report, count=1) == [2] and layers_to_densify(report, count=2) == [2, 5]
    baseline = {2: {"random_nmi": 0.0, "random_nmi_std": 0.01, "p_random": 0.6, "nmi": 0.0,
                    "random_position_nmi": float("nan")},
                5: {"random_nmi": 0.1, "random_nmi_std": 0.01, "p_random": 0.01, "nmi": 0.9,
                    "random_position_nmi": float("nan")}}
    report = layer_report(_stats(spec, rand, labels), baseline=baseline, repeats=5)
    assert report.set_index("block").loc[5, "recommend"] == "keep"
    assert report.set_index("block").loc[2, "recommend"] == "densify"
    assert report.set_index("block").loc[5, "p_holm"] == pytest.approx(0.02)
    assert layers_to_densify(report) == [2]
    assert math.isnan(report.loc[0, "position_nmi"])
