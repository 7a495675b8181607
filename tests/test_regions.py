"""Routing against ground-truth regions: patch labels by hand, and a region test whose baseline can fail (a planted
router is detected, a random one is not)."""
import pytest
import torch

from workbench.analysis.regions import patch_labels, region_test
from workbench.analysis.specialisation import RouterInputs


def test_patch_labels_majority_boundary_and_ignore():
    m = torch.zeros(1, 4, 4, dtype=torch.long)
    m[0, 0, 0:2] = 3          # patch (0,0): two 3s, two 0s -> tie goes to the lower label (argmax), boundary
    m[0, 2:4, 0:2] = 5        # patch (1,0): all 5, interior
    m[0, 0:2, 2:4] = 255      # patch (0,1): all ignored -> -1
    m[0, 2, 2] = 7            # patch (1,1): one 7 among 0s -> 0, boundary
    label, boundary = patch_labels(m, (2, 2), num_classes=11)
    assert label.tolist() == [[[0, -1], [5, 0]]]
    assert boundary.tolist() == [[[True, False], [False, True]]]


def _inputs(weight_fn, n=4000, classes=4, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    centres = torch.randn(classes, dim, generator=g) * 3
    x = centres[labels] + torch.randn(n, dim, generator=g)
    positions = torch.arange(n) % 16
    return RouterInputs(x, labels, positions, weight_fn(centres)), (torch.arange(n) % 5 == 0)


def test_planted_router_is_detected_and_a_random_one_is_not():
    planted, boundary = _inputs(lambda c: c.clone())  # expert e fires for class e
    r = region_test(planted, boundary, num_classes=4, draws=30)
    assert r["nmi"] > 0.8 and r["ami"] > 0.8 and r["p_nmi"] < 0.05 and r["excess"] > 0.2
    assert r["position_nmi"] < 0.01 and r["p_position_nmi"] > 0.05  # positions carry nothing here
    rnd, boundary = _inputs(lambda c: torch.randn(c.shape, generator=torch.Generator().manual_seed(7)) * c.norm()
                            / c.numel() ** 0.5)
    r = region_test(rnd, boundary, num_classes=4, draws=30)
    assert r["p_nmi"] > 0.05, "a random router is one more draw from the baseline: it must not come out specialised"
    assert r["p_bal_nmi"] > 0.05 and r["p_bal_mi"] > 0.05  # nor in the balanced test
    r = region_test(planted, boundary, num_classes=4, draws=30)
    assert r["p_bal_nmi"] == pytest.approx(1 / 31) and r["p_bal_mi"] == pytest.approx(1 / 31)


def test_region_report_on_an_untrained_segmentation_vimoe():
    """End to end on real scenes: one row per MoE block with every metric and its random-router baseline; routers
    that were never trained are one more draw of that baseline, so they do not come out specialised."""
    import timm

    import workbench  # noqa: F401
    from workbench.analysis.regions import NMI_METRICS, region_report
    from workbench.data.scenes import build_seg_splits

    torch.manual_seed(0)
    model = timm.create_model("vimoe_seg_micro_patch7_56", moe_layers="all", num_experts=4)
    _, val, _ = build_seg_splits("fmnist-scenes", val_size=200, model=model, augment=False, train_size=100,
                                 test_subset=10)
    table = region_report(model, val, max_images=100, draws=100)  # enough for Holm over 4 blocks to reject
    assert table["block"].tolist() == [0, 1, 2, 3] and table["patches"].iloc[0] > 0
    for metric in NMI_METRICS:
        assert {metric, f"random_{metric}", f"p_{metric}"} <= set(table.columns)
    assert not table["specialised"].any() and not table["specialised_balanced"].any()
    assert ((table["ami"] <= table["nmi"] + 1e-9)).all()  # AMI removes chance agreement
