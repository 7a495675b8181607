"""Pre-registered checks (did the arms learn?), claims over sets of placements (the interaction that claim 2 is
about), the class-token routing analysis and the project-wide view of every claim."""
import json

import numpy as np
import pytest
import torch
import yaml

from workbench.cli import main
from workbench.studies import answer
from workbench.studies.checks import (checks_by_seed, evaluate_checks, prediction_change, run_metric,
                                      study_is_void)
from workbench.studies.claims import evaluate_claims, format_project_claims, project_claims
from workbench.studies.spec import StudyError, load_study

PLACES = ["a", "b", "c"]


def _study(tmp_path, checks=None, claims=None, name="s"):
    study = {"name": name, "protocol": "scratch", "model": "vimoe_micro_patch7_28", "seeds": [0, 1, 2, 3],
             "configs": {"dense": {"moe_layers": "none"}, **{p: {"moe_layers": "last-1"} for p in PLACES},
                         **{f"{p}-s": {"moe_layers": "last-1", "shared_expert": "add"} for p in PLACES}},
             "checks": checks or [], "claims": claims or []}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def _record(results, study, config, seed, acc, spread=0.2, shift=0.5, preds=None, val=(0.8, 0.85, 0.86)):
    rec = {"study": study, "config": config, "seed": seed, "test_acc": acc, "val_acc": val[-1], "params": 1,
           "active_params": 1, "gmacs": 0.1, "expert_spread": {"2": spread, "3": spread},
           "router_init": {"3": {"router_shift": shift, "init_nmi": 0.1, "trained_nmi": 0.15}},
           "history": [{"val_acc": v} for v in val], "test_predictions": preds or "0123456789",
           "provenance": {"wall_time_s": 1.0, "threads": 1, "device": "cpu", "commit": "x"}}
    path = results / study / f"{config}__seed{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))


def test_range_and_worst_claims_are_treatment_minus_control_per_seed(tmp_path):
    claims = [{"id": "r", "says": "s", "kind": "range", "treatment": [f"{p}-s" for p in PLACES], "control": PLACES,
               "expect": "less"},
              {"id": "w", "says": "s", "kind": "worst", "treatment": [f"{p}-s" for p in PLACES], "control": PLACES,
               "expect": "greater"}]
    path = _study(tmp_path, claims=claims)
    results = tmp_path / "results"
    rng = np.random.default_rng(0)
    acc = {}
    for seed in range(4):
        for p in PLACES:
            acc[p, seed] = 0.80 + rng.normal(0, 0.01)
            acc[f"{p}-s", seed] = 0.82 + rng.normal(0, 0.002)
            _record(results, "s", p, seed, acc[p, seed])
            _record(results, "s", f"{p}-s", seed, acc[f"{p}-s", seed])
        _record(results, "s", "dense", seed, 0.8)
    table = evaluate_claims(path, results=results).set_index("id")

    def spread(names, s):
        v = [acc[n, s] * 100 for n in names]
        return max(v) - min(v)

    want_range = np.mean([spread([f"{p}-s" for p in PLACES], s) - spread(PLACES, s) for s in range(4)])
    want_worst = np.mean([min(acc[f"{p}-s", s] for p in PLACES) * 100 - min(acc[p, s] for p in PLACES) * 100
                          for s in range(4)])
    assert table.loc["r", "estimate"] == pytest.approx(want_range) and table.loc["r", "estimate"] < 0
    assert table.loc["w", "estimate"] == pytest.approx(want_worst) and table.loc["w", "n"] == 4
    assert "range over placements" in table.loc["r", "contrast"]


def test_a_failed_check_voids_the_claims_that_read_it(tmp_path):
    checks = [{"id": "moved", "says": "s", "metric": "expert_spread", "at_least": 0.10, "configs": ["a", "b"]}]
    claims = [{"id": "c", "says": "s", "treatment": "b", "expect": "greater"},
              {"id": "d", "says": "s", "treatment": "a", "expect": "greater"}]
    results = tmp_path / "results"
    path = _study(tmp_path, checks=checks, claims=claims)
    for seed in range(4):
        _record(results, "s", "dense", seed, 0.80)
        _record(results, "s", "a", seed, 0.85 + seed / 1000, spread=0.3)
        _record(results, "s", "b", seed, 0.85 + seed / 1000, spread=0.02)  # b's experts stayed copies
    table = evaluate_checks(path, results=results).set_index("config")
    assert table.loc["a", "passed"] and not table.loc["b", "passed"] and table.loc["b", "value"] == 0.02
    assert study_is_void(path, results=results) == (True, ["moved"])
    claims_table = evaluate_claims(path, results=results)
    # only the claim that reads b is void; the one about a keeps its verdict
    assert claims_table["verdict"].tolist() == ["void", "agrees"] and claims_table.attrs["failed_checks"] == ["moved"]
    assert claims_table["void_because"].tolist() == ["b failed moved", ""]  # which arm, which check
    row = {**claims_table.iloc[0].to_dict(), "column": "here", "claim": "c", "unit": "accuracy points",
           "status": "complete", "verdict_project": "void"}
    assert answer.finding_sentence(row).startswith(
        "here: the claim that s is void (b failed moved: the study file's checks that the arms learned): b minus dense")
    for seed in range(4):  # the same arm passing the check gets a real verdict
        _record(results, "s", "b", seed, 0.85 + seed / 1000, spread=0.3)
    assert evaluate_claims(path, results=results)["verdict"].tolist() == ["agrees", "agrees"]


def test_a_config_with_no_records_fails_its_check(tmp_path):
    checks = [{"id": "moved", "says": "s", "metric": "router_shift", "at_least": 0.25}]  # default: every arm
    path = _study(tmp_path, checks=checks)
    results = tmp_path / "results"
    _record(results, "s", "a", 0, 0.8, shift=0.9)
    table = evaluate_checks(path, results=results)
    assert set(table["config"]) == set(load_study(path)["configs"]) - {"dense"}
    assert table.set_index("config").loc["a", "passed"] and not table.set_index("config").loc["b", "passed"]


def test_run_metrics_read_the_record():
    rec = {"expert_spread": {"0": 0.1, "1": 0.3, "2": 0.2}, "router_init": {
        "0": {"router_shift": 0.4, "init_nmi": 0.1, "trained_nmi": 0.3},
        "1": {"router_shift": 0.6, "init_nmi": 0.2, "trained_nmi": 0.1}},
        "history": [{"val_acc": v} for v in (0.5, 0.6, 0.7, 0.71, 0.72, 0.725)]}
    assert run_metric(rec, "expert_spread") == 0.2
    assert run_metric(rec, "router_shift") == pytest.approx(0.5)
    assert run_metric(rec, "router_nmi_moved") == pytest.approx(0.15)
    assert run_metric(rec, "late_gain") == pytest.approx((0.725 - 0.71) * 100)  # epochs 5-6 of 6: from epoch 4
    assert np.isnan(run_metric({}, "expert_spread"))
    exact = {"history": [{"val_acc": v} for v in (0.5, 0.9098, 0.9118)]}  # 20 of 10,000 images: 0.2 points
    assert (0.9118 - 0.9098) * 100 > 0.2 and run_metric(exact, "late_gain") <= 0.2  # a rule's boundary holds


def test_prediction_change_is_relative_to_the_controls_own_seed_noise(tmp_path, capsys):
    path = _study(tmp_path)
    results = tmp_path / "results"
    _record(results, "s", "dense", 0, 0.8, preds="0000000000")
    _record(results, "s", "dense", 1, 0.8, preds="0000000011")  # control seed-to-seed: 20%
    _record(results, "s", "a", 0, 0.8, preds="0000111100")  # 40% from seed 0's control
    _record(results, "s", "a", 1, 0.8, preds="1111000011")  # 40% from seed 1's control
    assert prediction_change(load_study(path), results) == {"a": pytest.approx(2.0)}
    checks = [{"id": "moved", "says": "s", "metric": "prediction_change", "at_least": 0.8, "configs": ["a"]},
              {"id": "apart", "says": "s", "metric": "expert_spread", "at_least": 0.1, "configs": ["a"]}]
    path = _study(tmp_path, checks=checks)
    table = checks_by_seed(path, results)
    rows = [tuple(r) for r in table.itertuples(index=False)]
    assert rows[:3] == [("moved", "a", 0, pytest.approx(2.0), pytest.approx(0.4)),
                        ("moved", "a", 1, pytest.approx(2.0), pytest.approx(0.4)),
                        ("moved", "dense seed-to-seed", 0, pytest.approx(np.nan, nan_ok=True), pytest.approx(0.2))]
    assert rows[3:5] == [("apart", "a", 0, 0.2, pytest.approx(np.nan, nan_ok=True)),
                         ("apart", "a", 1, 0.2, pytest.approx(np.nan, nan_ok=True))]
    medians = table.dropna(subset=["value"]).groupby(["id", "config"])["value"].median()
    assert medians.to_dict() == evaluate_checks(path, results).set_index(["id", "config"])["value"].to_dict()
    assert main(["study", "checks", str(path), "--results", str(results), "--by-seed"]) == 0
    assert "dense seed-to-seed" in capsys.readouterr().out


def test_check_and_set_claim_errors_name_the_fix(tmp_path):
    with pytest.raises(StudyError, match="exactly one of at_least / at_most"):
        load_study(_study(tmp_path, checks=[{"id": "x", "says": "s", "metric": "expert_spread"}]))
    with pytest.raises(StudyError, match="metric='spread' is not one of"):
        load_study(_study(tmp_path, checks=[{"id": "x", "says": "s", "metric": "spread", "at_least": 1}]))
    with pytest.raises(StudyError, match="lists of at least two configs"):
        load_study(_study(tmp_path, claims=[{"id": "x", "says": "s", "kind": "range", "treatment": "a",
                                             "control": PLACES, "expect": "less"}]))
    with pytest.raises(StudyError, match="unique"):
        load_study(_study(tmp_path, claims=[{"id": "x", "says": "s", "treatment": "a", "expect": "greater"}],
                          checks=[{"id": "x", "says": "s", "metric": "expert_spread", "at_least": 1}]))
    with pytest.raises(StudyError, match="tokens="):
        load_study(_study(tmp_path, claims=[{"id": "x", "says": "s", "kind": "excess", "treatment": "a",
                                             "tokens": "all", "expect": "greater"}]))


def test_project_claims_put_every_study_in_one_family(tmp_path):
    results = tmp_path / "results"
    paths = []
    for name, shift in (("one", 0.0), ("two", 0.3)):
        claims = [{"id": f"c{i}", "says": "s", "treatment": p, "expect": "greater"} for i, p in enumerate(PLACES)]
        paths.append(_study(tmp_path, claims=claims, name=name))
        for seed in range(4):
            _record(results, name, "dense", seed, 0.80)
            for i, p in enumerate(PLACES):
                _record(results, name, p, seed, 0.80 + (shift + 0.1 * i) / 100 + seed * 1e-4 * (i + 1))
                _record(results, name, f"{p}-s", seed, 0.80)
    # a third study in progress (its shared arms not yet run): its claims read incomplete, outside the family
    claims = [{"id": "c0", "says": "s", "treatment": "a", "expect": "greater"}]
    paths.append(_study(tmp_path, claims=claims, name="three"))
    for seed in range(4):
        _record(results, "three", "dense", seed, 0.80)
        _record(results, "three", "a", seed, 0.85 + seed * 1e-4)
    table = project_claims(paths, results=results)
    three = table[table["study"] == "three"]
    assert list(three["verdict_project"]) == ["incomplete"] and three["p_project_holm"].isna().all()
    text = format_project_claims(table).splitlines()
    assert [line for line in text if line.startswith("three/")][0].count("(provisional: the study is incomplete)") == 1
    assert not any("provisional" in line for line in text if line.startswith(("one/", "two/")))
    assert (text[-1] == "* the verdict depends on the family it is read in") == any(x.endswith(" *") for x in text)
    table = table[table["study"] != "three"]
    assert len(table) == 6 and set(table["study"]) == {"one", "two"}
    family = table["p"].to_numpy()
    from workbench.analysis.stats import holm

    assert table["p_project_holm"].to_numpy() == pytest.approx(holm(family))
    assert (table["p_project_holm"] >= table["p_holm"] - 1e-12).all()  # a larger family never lowers p
    assert set(table["verdict_project_bh"]) <= {"agrees", "disagrees", "inconclusive"}


def test_cls_router_report_covers_the_class_token_only():
    import timm

    import workbench  # noqa: F401
    from workbench.analysis.specialisation import cls_router_report, router_inputs
    from workbench.data.classification import TensorData, synthetic

    torch.manual_seed(0)
    model = timm.create_model("vimoe_micro_patch7_28", moe_layers="last-2", num_experts=4, embed_dim=32,
                              num_heads=2).eval()
    data = TensorData(*synthetic(64, seed=1), (0.5,), (0.25,), 10)
    patch = router_inputs(model, data, max_images=32)
    cls = router_inputs(model, data, max_images=32, tokens="cls")
    assert set(cls) == set(patch) == {2, 3}
    assert cls[3].x.shape[0] == 32 and patch[3].x.shape[0] == 32 * 16 and cls[3].positions is None
    table = cls_router_report(model, data, draws=5, max_images=32)
    assert table["block"].tolist() == [2, 3] and (table["units"] == 32).all()
    assert table["p_random"].between(0, 1).all() and "specialised" in table
    pooled = timm.create_model("vimoe_micro_patch7_28", moe_layers="last-1", num_experts=4, embed_dim=32,
                               num_heads=2, class_token=False, global_pool="avg").eval()
    assert router_inputs(pooled, data, max_images=8, tokens="cls") == {}
    with pytest.raises(ValueError, match="tokens="):
        router_inputs(model, data, tokens="image")


def _guided_study(tmp_path, places, claims):
    study = {"name": "gd", "protocol": "scratch", "model": "vimoe_micro_patch7_28", "seeds": [0, 1, 2],
             "control": "dense",
             "configs": {"dense": {"moe_layers": "none"}, "all": {"moe_layers": "all"},
                         **{c: {"moe_layers": b} for c, b in places.items()}},
             "claims": claims}
    path = tmp_path / "gd.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def test_guided_claim_pairs_the_placement_routing_picks_with_the_mean_of_the_others(tmp_path):
    """Per seed, the k blocks whose routing (the guide run's, CLS token) most exceeds random routers (load-balanced
    by default) pick one k-of-L placement; its accuracy is paired with the mean of the other placements."""
    from itertools import combinations

    from workbench.studies.claims import guided_picks

    places = {f"p{a}{b}": [a, b] for a, b in combinations(range(4), 2)}
    claim = {"id": "g", "says": "s", "kind": "guided", "treatment": list(places), "guide": "all", "tokens": "cls",
             "expect": "greater"}
    claims = [claim, {**claim, "id": "g-all", "control": "all", "expect": "no_less", "margin": 0.5},
              {**claim, "id": "g-unbalanced", "rank_by": "excess"}]
    path = _guided_study(tmp_path, places, claims)
    results = tmp_path / "results"
    # balanced excess: seeds 0, 1 pick blocks 2, 3 (p23); seed 2 picks 0, 3 (p03); unbalanced: 1, 3 everywhere
    bal = {0: [0.0, 0.01, 0.05, 0.09], 1: [0.02, 0.0, 0.04, 0.05], 2: [0.06, 0.0, 0.01, 0.07]}
    acc = {(c, seed): 0.80 + 0.001 * i + 0.002 * seed for i, c in enumerate(places) for seed in range(3)}
    for seed in range(3):
        for config, blocks in places.items():
            _record(results, "gd", config, seed, acc[config, seed])
            rec_path = results / "gd" / f"{config}__seed{seed}.json"
            rec = json.loads(rec_path.read_text())
            rec["moe_test"] = {str(b): {"load": [0.5, 0.5]} for b in blocks}
            rec_path.write_text(json.dumps(rec))
        _record(results, "gd", "all", seed, 0.82)
        rec_path = results / "gd" / f"all__seed{seed}.json"
        rec = json.loads(rec_path.read_text())
        rec["routing_cls"] = {str(b): {"bal_excess": e, "excess": [0, 0.5, 0, 0.4][b], "nmi": e,
                                       "specialised": b == 3} for b, e in enumerate(bal[seed])}
        rec_path.write_text(json.dumps(rec))
        _record(results, "gd", "dense", seed, 0.8)
    study = load_study(path)
    picks = guided_picks(study, study["claims"][0], results)
    assert list(picks["placement"]) == ["p23", "p23", "p03"] and list(picks["specialised_blocks"]) == [1, 1, 1]
    assert picks["guidance"].str.startswith("no").all()  # one specialised block, k = 2
    table = evaluate_claims(path, results=results).set_index("id")

    def others(picked, seed):
        return np.mean([acc[c, seed] for c in places if c != picked]) * 100
    want = [acc["p23", 0] * 100 - others("p23", 0), acc["p23", 1] * 100 - others("p23", 1),
            acc["p03", 2] * 100 - others("p03", 2)]
    assert table.loc["g", "n"] == 3 and table.loc["g", "estimate"] == pytest.approx(np.mean(want))
    assert table.loc["g-all", "estimate"] == pytest.approx(
        np.mean([acc["p23", 0] * 100 - 82, acc["p23", 1] * 100 - 82, acc["p03", 2] * 100 - 82]))
    assert table.loc["g-unbalanced", "estimate"] == pytest.approx(
        np.mean([acc["p13", s] * 100 - others("p13", s) for s in range(3)]))
    assert "picked by all's routing" in table.loc["g", "contrast"]
    from workbench.studies.pruning import placement_ranking
    ranks = placement_ranking(study, "g", results)  # p23 is the best placement on every seed, p03 the 4th
    assert list(ranks["guided"]) == ["p23", "p23", "p03"] and list(ranks["guided_rank"]) == [1, 1, 4]
    assert ranks.loc[2, "p03"] == pytest.approx(acc["p03", 2] * 100) and list(ranks["specialised_blocks"]) == [1, 1, 1]
    from workbench.viz import guided_placements
    fig = guided_placements(ranks, reference=82.0)
    rings = next(t for t in fig.data if (t.name or "").startswith("routing's pick"))
    assert list(rings.x) == ["p23", "p23", "p03"] and rings.y[2] == pytest.approx(acc["p03", 2] * 100)
    assert list(fig.data[-1].x) == list(places) and fig.data[-1].y[0] == pytest.approx(
        np.mean([acc["p01", s] * 100 for s in range(3)]))
    with pytest.raises(ValueError, match="no guided claim 'g-none'"):
        placement_ranking(study, "g-none", results)
    from workbench.studies.pruning import gain_kept, picks_table
    table = picks_table(study, "g", results)  # block 3 passes on every seed; the unbalanced excess picks {1, 3}
    assert list(table["placement"]) == ["p23", "p23", "p03"] and list(table["specialised"]) == [[3], [3], [3]]
    assert not table["pick_is_specialised"].any() and list(table["excess_pick"]) == [[1, 3]] * 3
    kept = gain_kept(study, "g", "all", "dense", results)  # all 82%, dense 80%: a 2-point gain per seed
    assert list(kept["guided"]) == ["p23", "p23", "p03"] and list(kept["full_gain"]) == pytest.approx([2, 2, 2])
    assert kept.loc[2, "share_kept"] == pytest.approx((acc["p03", 2] * 100 - 80) / 2)
    # a placement list that is not every 2-of-4 placement once: refused when read
    short = _guided_study(tmp_path, places, [{**claim, "treatment": list(places)[:5]}])
    with pytest.raises(StudyError, match="must list every 2-of-4 placement"):
        evaluate_claims(short, results=results)
    for bad in ({k: v for k, v in claim.items() if k != "guide"}, {k: v for k, v in claim.items() if k != "tokens"},
                {**claim, "rank_by": "nmi"}):
        with pytest.raises(StudyError, match="a guided claim"):
            load_study(_guided_study(tmp_path, places, [bad]))


def test_a_referenced_arm_failing_its_own_studys_check_voids_the_claims_that_read_it(tmp_path):
    checks = [{"id": "moved", "says": "s", "metric": "expert_spread", "at_least": 0.1}]
    _study(tmp_path, checks=checks, name="base")
    other = {"name": "o", "protocol": "scratch", "model": "vimoe_micro_patch7_28", "seeds": [0, 1, 2, 3],
             "references": ["base"], "control": "base/dense", "configs": {"x": {"moe_layers": "last-1"}},
             "claims": [{"id": "reads-a", "says": "s", "treatment": "x", "control": "base/a", "expect": "greater"},
                        {"id": "reads-b", "says": "s", "treatment": "x", "control": "base/b", "expect": "greater"}]}
    path = tmp_path / "o.yaml"
    path.write_text(yaml.safe_dump(other, sort_keys=False))
    results = tmp_path / "results"
    for seed in range(4):
        for p in PLACES:
            _record(results, "base", p, seed, 0.8 + 0.001 * seed, spread=0.01 if p == "a" else 0.2)
        _record(results, "base", "dense", seed, 0.8)
        _record(results, "o", "x", seed, 0.85 + 0.002 * seed)
    table = evaluate_claims(path, results=results).set_index("id")
    assert table.loc["reads-a", "verdict"] == "void" and table.loc["reads-b", "verdict"] != "void"
    assert "base/a" in table.attrs["failed_configs"] and "base/b" not in table.attrs["failed_configs"]


def test_an_estimate_that_prints_as_zero_is_on_neither_side():
    from workbench.studies.claims import _side

    assert _side(-1e-9, "greater", 0.2) == "zero" and _side(3e-4, "less", 0.2) == "zero"
    assert _side(0.01, "greater", 0.2) == "claimed side" and _side(-0.01, "greater", 0.2) == "other side"
    assert _side(0.0, "no_less", 0.5) == "claimed side"  # a margin claim reads its margin, not zero


def test_prediction_shares_split_by_the_true_class(tmp_path):
    from workbench.studies.checks import shares_by_classes

    path = _study(tmp_path)
    results = tmp_path / "results"
    labels = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    _record(results, "s", "dense", 0, 0.8, preds="0000000000")
    _record(results, "s", "dense", 1, 0.8, preds="0000000011")  # seed-to-seed: 0 of 5 old, 2 of 5 new
    _record(results, "s", "a", 0, 0.8, preds="1000011100")  # 1 of 5 old, 3 of 5 new
    table = shares_by_classes(path, {"old": [0], "new": [1]}, labels=labels, results=results)
    got = {(r.config, r.group): r.share for r in table.itertuples()}
    assert got == {("a", "old"): pytest.approx(0.2), ("a", "new"): pytest.approx(0.6),
                   ("dense seed-to-seed", "old"): 0.0, ("dense seed-to-seed", "new"): pytest.approx(0.4)}
    with pytest.raises(ValueError, match="10 predictions for 3 test labels"):
        shares_by_classes(path, {"old": [0]}, labels=[0, 1, 1], results=results)


def test_regions_claims_read_the_excess_they_name_and_the_premise_counts_either_flag(tmp_path):
    """``metric:`` on an excess / depth_trend claim over segmentation regions: the class excess (default), the
    balanced test's, or patch position's, each the trained NMI minus the random routers'; and the premise count
    reads the unbalanced or the balanced Holm flag."""
    claims = [{"id": "c", "says": "s", "kind": "excess", "source": "regions", "treatment": "a", "blocks": [3],
               "expect": "greater", "margin": 0.01},
              {"id": "b", "says": "s", "kind": "excess", "source": "regions", "metric": "bal_excess",
               "treatment": "a", "blocks": [3], "expect": "greater", "margin": 0.01},
              {"id": "d", "says": "s", "kind": "depth_trend", "source": "regions", "metric": "bal_excess",
               "treatment": "a", "expect": "greater"},
              {"id": "p", "says": "s", "kind": "excess", "source": "regions", "metric": "position_excess",
               "treatment": "a", "expect": "greater", "margin": 0.01}]
    path = _study(tmp_path, claims=claims)
    results = tmp_path / "results"
    for seed in range(4):
        _record(results, "s", "a", seed, 0.8)
        rec_path = results / "s" / f"a__seed{seed}.json"
        rec = json.loads(rec_path.read_text())
        jitter = 0.001 * seed
        rec["regions"] = {str(b): {"nmi": 0.1, "random_nmi": 0.2 + jitter, "excess": -0.1 - jitter,
                                   "bal_nmi": 0.1 + 0.02 * b + jitter, "bal_random_nmi": 0.1,
                                   "position_nmi": 0.3 + jitter, "random_position_nmi": 0.1,
                                   "specialised": False, "specialised_balanced": b == 3}
                          for b in range(4)}
        rec_path.write_text(json.dumps(rec))
        assert run_metric(rec, "specialised_blocks_regions") == 0
        assert run_metric(rec, "specialised_blocks_regions_balanced") == 1
    table = evaluate_claims(path, results).set_index("id")
    assert table.loc["c", "estimate"] == pytest.approx(-0.1015) and table.loc["c", "verdict"] == "disagrees"
    assert table.loc["b", "estimate"] == pytest.approx(0.0615) and "balanced NMI" in table.loc["b", "contrast"]
    assert table.loc["d", "estimate"] == pytest.approx(0.02) and table.loc["d", "verdict"] == "agrees"
    assert table.loc["p", "estimate"] == pytest.approx(0.2015) and table.loc["p", "verdict"] == "agrees"
    with pytest.raises(StudyError, match="with source: regions also bal_excess or position_excess"):
        load_study(_study(tmp_path, claims=[{**claims[1], "source": "routing"}]))
    with pytest.raises(StudyError, match="is for excess and depth_trend claims"):
        load_study(_study(tmp_path, claims=[{"id": "x", "says": "s", "treatment": "a", "expect": "greater",
                                             "metric": "bal_excess"}]))
