"""The specialisation test must be able to fail: routers that were never trained come out *not* specialised,
while a router that does carry class information beyond what the features give for free comes out specialised."""
import pytest
import timm
import torch

import workbench  # noqa: F401
from workbench.data.classification import synthetic, TensorData
from workbench.analysis.routing import collect_routing
from workbench.analysis.specialisation import (RouterInputs, _table, layer_report, layers_to_densify, nmi, random_router_baseline, random_router_test, specialisation_report)
from workbench.analysis.stats import empirical_p


def _class_clustered(n=3000, d=16, classes=10, seed=0, spread=2.0):
    """Features with class structure, as deep layer inputs have."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    centres = torch.randn(classes, d, generator=g) * spread
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
    # 100 draws: the smallest Holm p over 4 layers is 4/101 < 0.05, so a layer could come out specialised
    report, stats = specialisation_report(model, data, draws=100, max_images=None, seed=0)
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
    from workbench.analysis.specialisation import router_inputs

    inputs = router_inputs(model, data, max_images=None)[3]
    means = torch.stack([inputs.x[inputs.labels == c].mean(0) for c in range(4)])
    with torch.no_grad():
        model.blocks[3].mlp.router.weight.copy_((means - inputs.x.mean(0)) * 50)
    baseline = random_router_baseline(model, data, draws=40, max_images=None)
    report = layer_report(collect_routing(model, data, progress=False), baseline=baseline).set_index("block")
    assert bool(report.loc[3, "specialised"]) and not bool(report.loc[2, "specialised"])
    assert bool(report.loc[3, "specialised_balanced"]) and not bool(report.loc[2, "specialised_balanced"])
    assert report.loc[3, "excess"] > report.loc[2, "excess"]


def test_layers_to_densify_needs_calls_or_a_count():
    model = timm.create_model("vimoe_micro_patch7_28", moe_layers="last-2", num_experts=4).eval()
    images, labels = synthetic(100, 10, 28, 1, seed=3)
    stats = collect_routing(model, TensorData(images, labels, (0.5,), (0.25,), 10), progress=False)
    report = layer_report(stats, repeats=3)
    with pytest.raises(ValueError, match="random-router baseline"):
        layers_to_densify(report)
    assert len(layers_to_densify(report, count=1)) == 1


# --- the load-matched random-router baseline ---------------------------------------------------------------

def _is_biased_argmax(scores, experts, E):
    """Pairwise condition of an argmax with per-expert biases: for experts e != f, every unit on f prefers f over
    e (relative to the other units' score differences) at least as much as any unit on e does."""
    for e in range(E):
        for f in range(E):
            on_e, on_f = experts == e, experts == f
            if e == f or not on_e.any() or not on_f.any():
                continue
            if (scores[on_f, e] - scores[on_f, f]).max() > (scores[on_e, e] - scores[on_e, f]).min() + 1e-9:
                return False
    return True


def test_match_load_meets_every_quota_with_one_bias_per_expert():
    from workbench.analysis.specialisation import match_load

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(1000, 8, generator=g)
    counts = torch.tensor([300, 200, 150, 100, 100, 80, 40, 30])
    experts = match_load(scores, counts)
    assert torch.equal(torch.bincount(experts, minlength=8), counts)
    assert (experts != scores.argmax(-1)).any() and _is_biased_argmax(scores, experts, 8)
    assert not _is_biased_argmax(scores, torch.randint(0, 8, (1000,), generator=g), 8)  # the check can fail
    # quotas that the argmax already meets change nothing
    free = torch.bincount(scores.argmax(-1), minlength=8)
    assert torch.equal(match_load(scores, free), scores.argmax(-1))
    empty = torch.tensor([500, 500, 0, 0, 0, 0, 0, 0])
    assert set(match_load(scores, empty).tolist()) == {0, 1}
    assert match_load(scores[:3, :4], torch.tensor([0, 0, 3, 0])).tolist() == [2, 2, 2]  # one expert takes all
    with pytest.raises(ValueError, match="quotas sum to 999"):
        match_load(scores, counts - torch.nn.functional.one_hot(torch.tensor(0), 8))


def test_match_load_meets_the_quotas_when_scores_tie():
    """Identical units cannot be split by biases; the least committed move so that every quota still holds."""
    from workbench.analysis.specialisation import match_load

    g = torch.Generator().manual_seed(1)
    scores = torch.randn(10000, 4, generator=g)
    scores[:4000] = scores[0]  # 40% identical rows
    experts = match_load(scores, torch.full((4,), 2500))
    assert torch.bincount(experts, minlength=4).tolist() == [2500] * 4
    doubled = torch.randn(500, 8, generator=g).repeat(2, 1)  # every row twice
    assert torch.bincount(match_load(doubled, torch.full((8,), 125)), minlength=8).tolist() == [125] * 8


def test_untrained_routers_pass_the_balanced_test_as_often_as_alpha():
    """Balancing the trained router and the draws alike keeps an untrained router one more draw: on 40
    untrained routers the balanced test rejects about 5%, as the plain random-router test does."""
    x, labels, _ = _class_clustered(spread=3.0)
    rejected = {"p_balanced": 0, "p_random": 0}
    for seed in range(40):
        w = torch.randn(8, 16, generator=torch.Generator().manual_seed(1000 + seed))
        r = random_router_test(RouterInputs(x, labels, None, w), 10, draws=20, seed=seed)
        for key in rejected:
            rejected[key] += r[key] < 0.05
    assert rejected["p_balanced"] <= 5 and rejected["p_random"] <= 5, rejected


def test_matching_the_draws_to_the_trained_loads_would_not_be_a_fair_null():
    """Why the balanced test balances both sides: random routers forced to an untrained router's own (uneven)
    loads carry less class information than it does, so it would beat them far more often than alpha."""
    from workbench.analysis.specialisation import match_load, random_weights

    x, labels, _ = _class_clustered(spread=3.0)
    rejected = 0
    for seed in range(40):
        w = torch.randn(8, 16, generator=torch.Generator().manual_seed(1000 + seed))
        inputs = RouterInputs(x, labels, None, w)
        chosen = inputs.first_choice(w)
        counts = torch.bincount(chosen, minlength=8)
        own = nmi(_table(labels, chosen, 10, 8))
        forced = [nmi(_table(labels, match_load(inputs.scores(r), counts), 10, 8))
                  for r in random_weights(w, 20, seed)]
        rejected += empirical_p(own, torch.tensor(forced).numpy()) < 0.05
    assert rejected >= 8, rejected  # >= 20% where alpha is 5%


def test_balanced_test_detects_a_planted_router_and_equalises_the_loads():
    x, labels, centres = _class_clustered()
    inputs = RouterInputs(x, labels, None, centres[:8].clone())
    r = random_router_test(inputs, 10, draws=50, seed=0)
    assert r["p_random"] == pytest.approx(1 / 51) and r["p_balanced"] == pytest.approx(1 / 51)
    assert r["bal_excess"] > 0.1
    from workbench.analysis.specialisation import match_load, mutual_information, random_weights, uniform_counts

    equal = uniform_counts(len(labels), 8)
    assert equal.sum() == len(labels) and equal.max() - equal.min() <= 1
    for w in random_weights(inputs.weight, 3, seed=1):
        experts = match_load(inputs.scores(w), equal)
        assert torch.equal(torch.bincount(experts, minlength=8), equal)
        h_balanced = mutual_information(_table(labels, experts, 10, 8))[2]
        h_plain = mutual_information(_table(labels, inputs.first_choice(w), 10, 8))[2]
        assert h_plain < h_balanced  # the plain draws' loads are uneven


def test_untrained_vimoe_layers_are_not_specialised_in_the_balanced_test_either():
    model = timm.create_model("vimoe_micro_patch7_28", moe_layers="all", num_experts=4).eval()
    images, labels = synthetic(400, 10, 28, 1, seed=3)
    data = TensorData(images, labels, (0.5,), (0.25,), 10)
    # 100 draws: the smallest Holm p over 4 layers is 4/101 < 0.05, so a layer could come out specialised
    report, _ = specialisation_report(model, data, draws=100, max_images=None, seed=0)
    assert not report["specialised_balanced"].any()
    assert (report["p_holm_balanced"] >= report["p_balanced"]).all()


def test_principal_weights_are_label_free_directions_at_the_trained_norm():
    from workbench.analysis.specialisation import principal_weights

    x, labels, _ = _class_clustered()
    inputs = RouterInputs(x, labels, None, torch.randn(8, 16))
    w = principal_weights(inputs)
    assert w.shape == (8, 16) and torch.allclose(w.norm(), inputs.weight.norm())
    assert torch.allclose(w[:4], -w[4:])
    shuffled = RouterInputs(x, labels[torch.randperm(len(labels))], None, inputs.weight)
    assert torch.equal(principal_weights(shuffled), w)  # the labels play no part
