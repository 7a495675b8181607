"""The specialisation test must be able to fail: routers that were never trained come out *not* specialised,
while a router that does carry class information beyond what the features give for free comes out specialised."""
import pytest
import timm
import torch

import workbench  # noqa: F401
from workbench.data import synthetic, TensorData
from workbench.routing import collect_routing
from workbench.specialisation import (RouterInputs, layer_report, layers_to_densify, random_router_baseline,
                                      random_router_test, specialisation_report)


def _class_clustered(n=3000, d=16, classes=10, seed=0):
    """Features with class structure, as deep layer inputs have."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    centres = torch.randn(classes, d, generator=g) * 2
    return centres[labels] + torch.randn(n, d, generator=g), labels, centres


def test_random_routers_on_class_clustered_features_are_not_specialised():
    """The label-permutation null would call these routers specialised: the features carry the class. The
    random-router baseline does not."""
    x, labels, _ = _class_clustered()
    rejected = 0
    for seed in range(20):
        w = torch.randn(8, 16, generator=torch.Generator().manual_seed(100 + seed))
        r = random_router_test(RouterInputs(x, labels, None, w), 10, draws=50, seed=seed)
        assert r["nmi"] > 0.1  # lots of class information for free...
        rejected += r["p_random"] < 0.05
    assert rejected <= 3  # ...but an untrained router is one more draw from the baseline: ~5% false positives


def test_a_router_aligned_with_the_classes_is_specialised():
    x, labels, centres = _class_clustered()
    w = centres[:8].clone()  # expert e responds to class e: learned specialisation
    r = random_router_test(RouterInputs(x, labels, None, w), 10, draws=50, seed=0)
    assert r["nmi"] > r["random_nmi"] + 5 * r["random_nmi_std"]
    assert r["p_random"] == pytest.approx(1 / 51)


def test_untrained_vimoe_layers_come_out_not_specialised():
    """End to end on a model: untrained routers (init), every layer, through collect_routing and the report."""
    model = timm.create_model("vimoe_micro_patch7_28", moe_layers="all", num_experts=4).eval()
    images, labels = synthetic(400, 10, 28, 1, seed=3)
    data = TensorData(images, labels, (0.5,), (0.25,), 10)
    report, stats = specialisation_report(model, data, draws=40, max_images=None, seed=0)
    assert len(report) == 4 and not report["specialised"].any()
    assert (report["p_holm"] >= report["p_random"]).all()
    assert set(report["recommend"]) == {"densify"}
    assert layers_to_densify(report) == [0, 1, 2, 3]
    # the permutation null, by contrast, is beaten by these untrained routers in every layer
    assert (report["nmi"] > report["null_nmi"] + 3 * report["null_nmi_std"]).all()


def test_trained_router_specialises_where_it_was_trained_to():
    """Set one layer's router to the direction that separates the synthetic classes: only it is specialised."""
    model = timm.create_model("vimoe_micro_patch7_28", moe_layers="last-2", num_experts=4).eval()
    images, labels = synthetic(400, 10, 28, 1, seed=3)
    data = TensorData(images, labels, (0.5,), (0.25,), 10)
    from workbench.specialisation import router_inputs

    inputs = router_inputs(model, data, max_images=None)[3]
    means = torch.stack([inputs.x[inputs.labels == c].mean(0) for c in range(4)])
    with torch.no_grad():
        model.blocks[3].mlp.router.weight.copy_((means - inputs.x.mean(0)) * 50)
    baseline = random_router_baseline(model, data, draws=40, max_images=None)
    report = layer_report(collect_routing(model, data, progress=False), baseline=baseline).set_index("block")
    assert bool(report.loc[3, "specialised"]) and not bool(report.loc[2, "specialised"])
    assert report.loc[3, "excess"] > report.loc[2, "excess"]


def test_layers_to_densify_needs_calls_or_a_count():
    model = timm.create_model("vimoe_micro_patch7_28", moe_layers="last-2", num_experts=4).eval()
    images, labels = synthetic(100, 10, 28, 1, seed=3)
    stats = collect_routing(model, TensorData(images, labels, (0.5,), (0.25,), 10), progress=False)
    report = layer_report(stats, repeats=3)
    with pytest.raises(ValueError, match="random-router baseline"):
        layers_to_densify(report)
    assert len(layers_to_densify(report, count=1)) == 1
