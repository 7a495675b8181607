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
        rec = {"study": "g", "config": config, "seed": seed, "test_acc": a, "val_acc": a,
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
    assert row["placement"] == "first-1" and bool(row["shared"]) and row["test_acc"] == pytest.approx(80.0)
    assert not grid[grid["config"] == "b"]["shared"].any()
    ranges = regime.placement_ranges(grid).set_index(["seed", "shared"])
    assert len(ranges) == 2  # seed 1 lacks c: its range is not taken over two placements
    assert ranges.loc[(0, False), "range"] == pytest.approx(3.0)
    assert ranges.loc[(0, True), "range"] == pytest.approx(1.0)
    assert ranges.loc[(0, True), "worst"] == pytest.approx(80.0)
    assert regime.control_mean(s, results=results) == pytest.approx(81.0)
    assert regime.control_mean(s, seeds=[0], results=results) == pytest.approx(80.0)


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
