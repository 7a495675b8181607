"""The regime studies' views: progress, curves, the placement x shared grid that claim 2 reads, and its figure."""
import json

import pytest
import yaml

from workbench.studies import regime
from workbench.studies.spec import load_study
from workbench.viz import placement_interaction

PLACES = {"a": "last-1", "b": "first-1", "c": "all"}


@pytest.fixture
def study(tmp_path):
    spec = {"name": "g", "protocol": "scratch", "model": "vimoe_micro_patch7_28", "seeds": [0, 1],
            "control": "dense", "common": {"shared_expert": "none"},
            "configs": {"dense": {"moe_layers": "none"}, **{p: {"moe_layers": m} for p, m in PLACES.items()},
                        **{f"{p}-s": {"moe_layers": m, "shared_expert": "add"} for p, m in PLACES.items()}}}
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    results = tmp_path / "results"
    acc = {("dense", 0): 0.80, ("dense", 1): 0.82,
           ("a", 0): 0.81, ("b", 0): 0.78, ("c", 0): 0.80, ("a-s", 0): 0.81, ("b-s", 0): 0.80, ("c-s", 0): 0.805,
           ("a", 1): 0.83, ("b", 1): 0.80}  # seed 1: the shared half and c not yet recorded
    for (config, seed), a in acc.items():
        rec = {"study": "g", "config": config, "seed": seed, "test_acc": a, "val_acc": a, "test_miou": a - 0.5,
               "history": [{"epoch": 1, "val_acc": a - 0.02, "test_acc": a - 0.01},
                           {"epoch": 2, "val_acc": a, "test_acc": a}],
               "provenance": {"commit": "x"}}
        out = results / "g" / f"{config}__seed{seed}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rec))
    return load_study(path), results


def test_status_says_how_far_and_that_an_incomplete_study_decides_nothing(study):
    s, results = study
    assert regime.progress(s, results) == (10, 14)
    line = regime.status(s, results)
    assert "10 of 14" in line and "seeds 0, 1" in line and "no claim has a verdict" in line


def test_grid_ranges_and_control_mean(study):
    s, results = study
    grid = regime.placement_grid(s, results)
    assert "dense" not in set(grid["config"])
    assert list(grid["config"])[:2] == ["a", "a"]  # the study file's order, then seed
    row = grid[(grid["config"] == "b-s")].iloc[0]
    assert row["placement"] == "first-1" and bool(row["shared"]) and row["score"] == pytest.approx(80.0)
    assert not grid[grid["config"] == "b"]["shared"].any()
    ranges = regime.placement_ranges(grid).set_index(["seed", "shared"])
    assert len(ranges) == 2  # seed 1 lacks c: its range is not taken over two placements
    assert ranges.loc[(0, False), "range"] == pytest.approx(3.0)
    assert ranges.loc[(0, True), "range"] == pytest.approx(1.0)
    assert ranges.loc[(0, True), "worst"] == pytest.approx(80.0)
    assert regime.control_mean(s, results=results) == pytest.approx(81.0)
    assert regime.control_mean(s, seeds=[0], results=results) == pytest.approx(80.0)


def test_grid_tables_and_control_read_the_study_metric(study):
    s, results = study
    s = {**s, "metric": "test_miou"}  # a segmentation study's score: test mIoU in points
    grid = regime.placement_grid(s, results)
    assert grid[grid["config"] == "b-s"].iloc[0]["score"] == pytest.approx(30.0)
    assert regime.placement_ranges(grid).set_index(["seed", "shared"]).loc[(0, True), "worst"] == pytest.approx(30.0)
    assert regime.accuracy_table(s, results).set_index("config").loc["a", "mean"] == pytest.approx(32.0)
    assert regime.control_mean(s, results=results) == pytest.approx(31.0)
    fig = placement_interaction(grid, score="test mIoU (points)")
    assert fig.layout.yaxis.title.text == "test mIoU (points)"


def test_mean_curves_average_the_seeds_in_file_order(study):
    s, results = study
    mean = regime.curves(s, mean=True, results=results)
    a = mean[mean["config"] == "a"].set_index("epoch")
    assert a.loc[2, "val_acc"] == pytest.approx(0.82) and a.loc[2, "seeds"] == 2
    assert list(dict.fromkeys(mean["config"])) == list(s["configs"])
    assert len(regime.curves(s, results=results)) == 20


def test_interaction_figure_has_a_mean_line_per_half_and_the_reference(study):
    s, results = study
    fig = placement_interaction(regime.placement_grid(s, results), reference=80.0, names=("top-2", "shared"))
    means = [t for t in fig.data if t.showlegend is not False]
    assert [t.name for t in means] == ["top-2 (n=2, mean)", "shared (n=1, mean)"]
    assert means[0].y[0] == pytest.approx(82.0)  # placement a, mean of seeds 0 and 1
    assert not means[0].error_y.visible and not means[1].error_y.visible  # intervals from three seeds on
    assert means[0].x[0] < 0 < means[1].x[0]  # the halves side by side
    assert any(shape.y0 == 80.0 for shape in fig.layout.shapes)


def test_unknown_regime_study_names_the_known_ones():
    with pytest.raises(FileNotFoundError, match="upcycle4"):
        regime.load("nope")


def test_accuracy_table_has_a_column_per_seed_and_the_mean(study):
    s, results = study
    table = regime.accuracy_table(s, results).set_index("config")
    assert list(table.index) == ["dense", "a", "b", "c", "a-s", "b-s", "c-s"]
    assert table.loc["a", "seed 1"] == 83.0 and table.loc["a", "mean"] == pytest.approx(82.0)
    assert table.loc["c", "mean"] == pytest.approx(80.0)  # one seed recorded


def test_routing_by_block_sets_patch_and_cls_side_by_side(study):
    s, results = study
    for seed, (patch, cls) in enumerate([(0.01, 0.09), (0.03, 0.11)]):
        path = results / "g" / f"a__seed{seed}.json"
        rec = json.loads(path.read_text())
        layer = lambda e, sp: {"excess": e, "bal_excess": e / 2, "specialised": sp, "nmi": e}  # noqa: E731
        rec["routing"] = {"3": layer(patch, False)}
        rec["routing_cls"] = {"3": layer(cls, seed == 1)}
        path.write_text(json.dumps(rec))
    table = regime.routing_by_block(s, "a", results).set_index("block")
    assert table.loc[3, "patch_excess"] == pytest.approx(0.02) and table.loc[3, "cls_excess"] == pytest.approx(0.10)
    assert table.loc[3, "cls_bal_excess"] == pytest.approx(0.05) and table.loc[3, "cls_specialised"] == 1
    assert table.loc[3, "seeds"] == 2
    assert list(regime.routing_by_block(s, "b", results).columns) == ["block"]  # nothing recorded


def _pilot(tmp_path, shares, nmi=0.05, dense_acc=0.90, missing=False, seeds=(0, 1)):
    """A two-seed schedule pilot: dense control (seed-to-seed share 0.2) and one MoE arm whose predictions differ
    from the same seed's control on ``shares`` of 10 test images (ratio to the noise = share / 0.2)."""
    checks = [{"id": "experts-moved", "says": "x", "metric": "expert_spread", "at_least": 0.10},
              {"id": "router-choices-moved", "says": "x", "metric": "router_nmi_moved", "at_least": 0.01},
              {"id": "predictions-moved", "says": "x", "metric": "prediction_change", "at_least": 0.8}]
    spec = {"name": "p", "protocol": "scratch", "model": "vimoe_micro_patch7_28", "seeds": list(seeds),
            "control": "dense", "configs": {"dense": {"moe_layers": "none"}, "a": {"moe_layers": "last-1"}},
            "checks": checks}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    results = tmp_path / "results"
    dense = {seed: ("1" * 2 * seed).ljust(10, "0") for seed in seeds}  # consecutive seeds differ on 2 of 10
    runs = [("dense", seed) for seed in seeds] + [("a", seed) for seed in seeds[: len(seeds) - missing]]
    for config, seed in runs:
        if config == "dense":
            preds, extra = dense[seed], {}
        else:
            k = round(10 * shares[seed])
            preds = "".join(("2" if i < k else c) for i, c in enumerate(dense[seed]))
            extra = {"expert_spread": {"3": 0.2}, "router_init": {"3": {"router_shift": 1.0, "trained_nmi": nmi,
                                                                        "init_nmi": 0.0}}}
        rec = {"study": "p", "config": config, "seed": seed, "test_acc": dense_acc, "val_acc": dense_acc,
               "history": [{"epoch": 1, "val_acc": dense_acc, "test_acc": dense_acc}], "test_predictions": preds,
               "provenance": {"commit": "x"}, "base_test_acc": 0.9018, **extra}
        out = results / "p" / f"{config}__seed{seed}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rec))
    return load_study(path), results


@pytest.mark.parametrize("shares, nmi, acc, missing, outcome, band", [
    ({0: 0.2, 1: 0.2}, 0.05, 0.90, False, "rule (1) adopted", "adopt"),            # ratio 1.0
    ({0: 0.2, 1: 0.1}, 0.05, 0.90, False, "rule (1) borderline", "borderline"),    # ratio 0.75
    ({0: 0.1, 1: 0.1}, 0.05, 0.90, False, "fails outright (a below a floor)", "fails"),  # ratio 0.5
    ({0: 0.2, 1: 0.2}, 0.01, 0.90, False, "rule (1) borderline", "adopt"),         # router in [0.005, 0.015)
    ({0: 0.2, 1: 0.2}, 0.05, 0.89, False, "dense mean below 89.68%", "adopt"),
    ({0: 0.2, 1: 0.2}, 0.05, 0.90, True, "3 of 4 runs recorded", None),
])
def test_schedule_rule_adopts_asks_for_seeds_or_fails(tmp_path, shares, nmi, acc, missing, outcome, band):
    s, results = _pilot(tmp_path, shares, nmi, acc, missing)
    table, line = regime.schedule_rule(s, results)
    assert outcome in line
    if band is None:
        assert table.empty
    else:
        assert table.set_index("check").loc["predictions-moved", "band"] == band


def test_pilots_load_by_folder():
    assert regime.load("pilots/upcycle4_finetune8")["name"] == "pilot-upcycle4-finetune8"
    with pytest.raises(FileNotFoundError, match="upcycle4_finetune8"):
        regime.load("pilots/nope")


def test_schedule_rule_after_more_seeds_uses_the_checks_own_thresholds(tmp_path):
    # ratios 1, 1, 0.5, 0.5: median 0.75, below the check's 0.8 (on two seeds it would be borderline)
    s, results = _pilot(tmp_path, {0: 0.2, 1: 0.2, 2: 0.1, 3: 0.1}, seeds=(0, 1, 2, 3))
    table, line = regime.schedule_rule(s, results)
    row = table.set_index("check").loc["predictions-moved"]
    assert row["band"] == "fails" and row["adopt at"] == 0.8 and "fails outright" in line
    # router NMI 0.01 meets the check's own 0.01; ratios 1, 1, 1, 0.5: median 1.0
    (tmp_path / "b").mkdir()
    s, results = _pilot(tmp_path / "b", {0: 0.2, 1: 0.2, 2: 0.2, 3: 0.1}, nmi=0.01, seeds=(0, 1, 2, 3))
    assert regime.schedule_rule(s, results)[1].endswith("rule (1) adopted")


def test_floor_rule_reads_the_pilots_own_dense_floor():
    """pilots/upcycle_half.yaml's rule (1) on its first two seeds: borderline (router-choices-moved for first-2 and
    all-shared) with the dense mean above its 80% floor; the same records fail outright under a 90% floor."""
    study = dict(regime.load("pilots/upcycle_half"), seeds=[940, 941])
    table, line = regime.floor_rule(study, 80.0)
    assert "dense mean 85.745% (floor 80.00%); rule (1) borderline" in line
    assert sorted(table.loc[table["band"] == "borderline", "config"]) == ["all-shared", "first-2"]
    assert "fails outright (dense mean below 90.00%)" in regime.floor_rule(study, 90.0)[1]


def test_regions_by_block_averages_seeds_and_takes_the_excess(study):
    s, results = study
    for seed, nmi in ((0, 0.30), (1, 0.10)):
        path = results / "g" / f"a__seed{seed}.json"
        rec = json.loads(path.read_text())
        rec["regions"] = {"3": {"nmi": nmi, "random_nmi": 0.15, "bal_nmi": nmi, "bal_random_nmi": 0.25,
                                "position_nmi": 0.2, "random_position_nmi": 0.1, "specialised": seed == 0}}
        path.write_text(json.dumps(rec))
    table = regime.regions_by_block(s, results)
    assert list(table["config"]) == ["a"] and table.loc[0, "seeds"] == 2
    row = table.iloc[0]
    assert row["nmi"] == pytest.approx(0.20) and row["excess"] == pytest.approx(0.05)
    assert row["bal_excess"] == pytest.approx(-0.05) and row["specialised"] == 1
    assert regime.regions_by_block({**s, "name": "none"}, results).empty


def test_regions_premise_counts_the_blocks_each_test_flags_and_reads_the_run_rule(study):
    s, results = study
    flags = {0: ([2, 3], [3]), 1: ([3], [])}  # seed -> (balanced, unbalanced)
    for seed in (0, 1):
        path = results / "g" / f"a__seed{seed}.json"
        rec = json.loads(path.read_text())
        rec["regions"] = {str(b): {"nmi": 0.2, "random_nmi": 0.1 + 0.1 * seed, "bal_nmi": 0.3, "bal_random_nmi": 0.2,
                                   "object_only_nmi": 0.1, "random_object_only_nmi": 0.05, "position_nmi": 0.4,
                                   "random_position_nmi": 0.1, "specialised": b in flags[seed][1],
                                   "specialised_balanced": b in flags[seed][0]} for b in range(4)}
        rec["router_init"] = {str(b): {"init_nmi": 0.3, "trained_nmi": 0.1 * b, "router_shift": 1.0}
                              for b in range(4)}
        path.write_text(json.dumps(rec))
    blocks, seeds, rule = regime.regions_premise(s, "a", results)
    assert list(blocks["block"]) == [0, 1, 2, 3] and set(blocks["seeds"]) == {2}
    row = blocks.set_index("block").loc[3]
    assert row["excess"] == pytest.approx(0.05) and row["bal_excess"] == pytest.approx(0.1)
    assert row["object_only_excess"] == pytest.approx(0.05) and row["position_excess"] == pytest.approx(0.3)
    assert row["specialised"] == 1 and row["specialised_balanced"] == 2 and row["trained_nmi"] == pytest.approx(0.3)
    assert seeds["balanced"].tolist() == [[2, 3], [3]] and seeds["unbalanced"].tolist() == [[3], []]
    assert rule.startswith("premise (balanced test): median 1.5 block(s) per seed over 2 seeds (2, 1); fewer than 2")
    assert regime.regions_premise({**s, "name": "none"}, "a", results)[2] == "a: nothing recorded"


def test_regions_premise_on_records_without_the_balanced_test_says_so(study):
    s, results = study
    path = results / "g" / "a__seed0.json"
    rec = json.loads(path.read_text())
    rec["regions"] = {"3": {"nmi": 0.2, "random_nmi": 0.1, "position_nmi": 0.2, "random_position_nmi": 0.1,
                            "specialised": True}}
    path.write_text(json.dumps(rec))
    blocks, seeds, rule = regime.regions_premise(s, "a", results)
    assert seeds["unbalanced"].tolist() == [[3]] and seeds["balanced"].tolist() == [[]]
    assert rule.startswith("these records have no balanced random-router test") and "median of 1 block(s)" in rule


def test_joint_claims_sets_a_replication_beside_its_earlier_study_without_pooling():
    """upcycle_half_claim1.yaml's rule (c): one row per (claim, study) for the shared claims, each study's own
    estimate, interval, Holm p and verdict, and whether the replication's estimate lies inside the earlier interval.
    Read here with the recorded earlier study on both sides: every estimate lies inside its own interval."""
    from workbench.studies import evaluate_claims

    earlier = regime.load("upcycle_half")
    table = regime.joint_claims(earlier, earlier)
    ids = ["late-moe-helps", "early-moe-hurts", "all-layers-hurt", "shared-narrows-placement-range",
           "shared-lifts-worst-placement", "shared-beats-top2-last2"]
    assert table["claim"].tolist() == [i for i in ids for _ in range(2)]
    first = table.iloc[::2]
    assert (first["inside earlier interval"] == "yes").all() and (table.iloc[1::2]["inside earlier interval"] == "").all()
    own = evaluate_claims(earlier).set_index("id")
    assert first.set_index("claim")["verdict"].to_dict() == own.loc[ids, "verdict"].to_dict()
    assert first.set_index("claim")["estimate"].to_dict() == own.loc[ids, "estimate"].to_dict()
    later = regime.joint_claims(regime.load("upcycle_half_claim1"), earlier)  # only the claims both files hold
    assert later["claim"].unique().tolist() == ids[:3]


def test_learned_shows_status_checks_accuracy_and_class_group_shares():
    h = regime.load("upcycle_half")
    line, tables = regime.learned(h, {"old": [0, 1, 2, 3, 4], "new": [5, 6, 7, 8, 9]})
    assert line == regime.status(h) and len(tables) == 3
    assert tables[0].equals(regime.checks_table(h)) and tables[1].equals(regime.accuracy_table(h))
    assert set(tables[2]["group"]) == {"old", "new"} and list(tables[2].columns) == ["config", "group", "mean", "min", "max"]
    assert len(regime.learned(h)[1]) == 2
