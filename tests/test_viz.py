import importlib.util
import json
import shutil

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import timm

from workbench.data.classification import TensorData, synthetic
from workbench.analysis.flops import profile
from workbench.viz.palette import EXPERT_COLORS, expert_color, expert_rgb
from workbench.analysis.routing import collect_routing, run_with_routing
from workbench.analysis.specialisation import layer_report
from workbench import viz


@pytest.fixture(scope="module")
def routed():
    model = timm.create_model("vimoe_tiny_patch4_28", moe_layers="last-2", num_experts=4).eval()
    images, labels = synthetic(40, 10, 28, 1, seed=0)
    data = TensorData(images, labels, (0.5,), (0.25,), 10)
    stats = collect_routing(model, data, batch_size=20, progress=False)
    x = data.normalise(data.images[:2])
    _, cache = run_with_routing(model, x)
    return model, stats, x, cache


def test_palette_is_stable():
    assert expert_color(0) == EXPERT_COLORS[0] and expert_color(16) == expert_color(0)
    assert expert_rgb(7) == tuple(int(EXPERT_COLORS[7][i:i + 2], 16) for i in (1, 3, 5))


def test_heatmap_has_slider_one_range_to_the_data_max_and_opens_on_the_most_specialised_block(routed):
    _, stats, _, _ = routed
    names = [f"class {i}" for i in range(10)]
    fig = viz.class_expert_heatmap(stats, class_names=names)
    assert isinstance(fig, go.Figure) and len(fig.data) == 2
    top = max(float(np.max(t.z)) for t in fig.data)
    assert len({t.zmax for t in fig.data}) == 1 and top <= fig.data[0].zmax < top + 0.05 + 1e-9
    assert all(t.zmin == 0 for t in fig.data) and list(fig.data[0].y) == names
    assert len(fig.layout.sliders[0].steps) == 2
    from workbench.viz.figures import _nmi

    nmis = [_nmi(np.asarray(s.class_expert, dtype=float)) for _, s in sorted(stats.layers.items())]
    shown = [t.visible for t in fig.data].index(True)
    assert shown == int(np.argmax(nmis)) == fig.layout.sliders[0].active


def test_forest_plot_gives_each_protocol_its_own_panel_and_the_segmentation_panels_an_expert_legend():
    import pandas as pd

    t = pd.DataFrame({"config": ["a", "b"], "delta": [0.1, -0.2], "low": [-0.1, -0.4], "high": [0.3, 0.0]})
    fig = viz.forest_plot({"scratch": t, "upcycle": t}, unit="mIoU points")
    assert len(fig.data) == 2 and fig.data[0].xaxis != fig.data[1].xaxis
    assert "mIoU points" in fig.layout.xaxis.title.text
    assert fig.layout.xaxis.range is None  # own scales by default
    wide = t.assign(high=[0.3, 1.5])
    shared = viz.forest_plot({"a": t, "b": wide}, margin=0.2, shared_x=True)
    assert shared.layout.xaxis.range == shared.layout.xaxis2.range and shared.layout.xaxis.range[1] > 1.5
    dotted = [s for s in shared.layout.shapes if s.line.dash == "dot"]
    assert sorted({s.x0 for s in dotted}) == [-0.2, 0.2] and len(dotted) == 4 and "0.2 margin" in shared.layout.title.text
    rows = [{"image": np.zeros((28, 28)), "ground truth": np.zeros((28, 28), int),
             "block 3": np.array([[0, 1], [2, 1]])}]
    names = [d.name for d in viz.segmentation_panels(rows, ["background"]).data if d.name]
    assert {"expert 0", "expert 1", "expert 2", "background"} <= set(names)


def test_heatmap_from_recorded_tables_matches_stats(routed):
    _, stats, _, _ = routed
    tables = {b: s.class_expert.int().tolist() for b, s in stats.layers.items()}
    a, b = viz.class_expert_heatmap(stats), viz.class_expert_heatmap(tables)
    for ta, tb in zip(a.data, b.data):
        np.testing.assert_allclose(np.asarray(ta.z), np.asarray(tb.z))


def test_position_maps_colour_each_position_by_its_dominant_expert():
    counts = np.zeros((4, 3))
    counts[[0, 1, 2, 3], [2, 0, 0, 1]] = 10  # positions 0..3 -> experts 2, 0, 0, 1
    fig = viz.position_maps({5: counts.tolist()}, (2, 2))
    img = np.asarray(fig.data[0].z)
    h, w = img.shape[0] // 2, img.shape[1] // 2
    for pos, e in enumerate([2, 0, 0, 1]):  # full share: the patch centre is the expert's colour
        r, c = divmod(pos, 2)
        assert tuple(img[r * h + h // 2, c * w + w // 2]) == expert_rgb(e)
    assert sorted(t.name for t in fig.data[1:]) == ["expert 0", "expert 1", "expert 2"]


def test_specialisation_by_depth_means_over_seeds():
    import pandas as pd

    rows = pd.DataFrame({"group": ["a"] * 4, "seed": [0, 1, 0, 1], "block": [0, 0, 1, 1],
                         "nmi": [0.1, 0.3, 0.5, 0.7], "null_nmi": [0.01] * 4})
    fig = viz.specialisation_by_depth(rows)
    assert list(fig.data[0].y) == pytest.approx([0.2, 0.6]) and fig.data[0].name == "a (n=2)"
    assert list(fig.data[0].error_y.array) == pytest.approx([0.1, 0.1])


def test_metrics_figure(routed):
    _, stats, _, _ = routed
    fig = viz.metrics_by_layer(layer_report(stats, repeats=3))
    assert any(t.name == "nmi (null)" for t in fig.data)


def test_overlay_colours_patches_by_expert(routed):
    experts = np.array([[0, 1], [2, 3]])
    rgb = viz.overlay_rgb(np.zeros((16, 16)), experts, alpha=1.0, scale=8)
    assert rgb.shape == (16, 16, 3)
    assert tuple(rgb[4, 4]) == expert_rgb(0) and tuple(rgb[12, 12]) == expert_rgb(3)
    _, _, x, cache = routed
    fig = viz.patch_overlay(x[0], cache[5])
    assert isinstance(fig.data[0], go.Image) and len(fig.data) == 1 + 4


def test_load_over_training(tmp_path):
    rows = [{"epoch": e, "moe_train": {"5": {"load": [0.5, 0.5], "load_cv": 0, "drop_rate": 0}}} for e in (1, 2)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = viz.load_over_training(path)
    assert len(fig.data) == 2 and list(fig.data[0].x) == [1, 2]
    dense = tmp_path / "dense.jsonl"
    dense.write_text(json.dumps({"epoch": 1, "moe_train": {}}) + "\n")
    with pytest.raises(ValueError, match="dense run"):
        viz.load_over_training(dense)


def test_flops_breakdown_and_html_export(routed, tmp_path):
    model = routed[0]
    fig = viz.flops_breakdown(profile(model))
    assert fig.layout.barmode == "stack"
    written = viz.save_figure(fig, tmp_path / "flops", png=False)
    assert written[0].suffix == ".html" and written[0].stat().st_size > 10000


def png_export_missing() -> str | None:
    """Why PNG export cannot run here (plotly needs kaleido, kaleido needs a Chromium), or None when it can."""
    try:
        kaleido = importlib.util.find_spec("kaleido")
    except (ImportError, ValueError):
        kaleido = None
    if kaleido is None:
        return "kaleido is not installed: PNG export needs it (pip install 'kaleido>=1', the dev extra)"
    if not any(shutil.which(name) for name in ("chromium", "chromium-browser")):
        return "no Chromium for kaleido's PNG export (make setup installs it: apt-get install chromium)"
    return None


def test_png_export_skips_with_a_reason_without_kaleido_or_chromium(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: f"/usr/bin/{name}")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    assert "kaleido is not installed" in png_export_missing()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: object())
    assert png_export_missing() is None
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    assert "no Chromium" in png_export_missing()


def test_png_export(routed, tmp_path):
    if reason := png_export_missing():
        pytest.skip(reason)
    written = viz.save_figure(viz.flops_breakdown(profile(routed[0])), tmp_path / "flops", png=True)
    assert written[1].suffix == ".png" and written[1].read_bytes()[:4] == b"\x89PNG"


def test_expert_pruning_figure_has_one_trace_per_method_and_the_unpruned_line():
    table = pd.DataFrame({"keep": [4, 4, 4, 2, 2], "method": ["reap", "reap_ft", "random", "reap", "random"],
                          "test_acc": [88.0, 89.5, 80.0, 70.0, 60.0], "params": [500, 500, 500, 300, 300]})
    fig = viz.expert_pruning(table, unpruned=90.0)
    names = [t.name for t in fig.data]
    assert names == ["reap", "reap_ft", "random"]
    reap = fig.data[0]
    assert list(reap.y) == [88.0, 70.0] and list(reap.text) == ["4", "2"]
    assert fig.data[1].marker.symbol == "circle-open" and fig.data[2].marker.color == "#888888"
    assert fig.layout.shapes[0].y0 == 90.0 and len(fig.layout.shapes) == 1
    assert viz.expert_pruning(table, unpruned=90.0, unpruned_ft=90.2).layout.shapes[1].y0 == 90.2


def test_accuracy_by_epoch_draws_one_line_per_run_and_shades_its_last_third():
    rows = pd.DataFrame({"pilot": ["a"] * 6 + ["b"] * 120, "config": "dense",
                         "epoch": list(range(1, 7)) + list(range(1, 121)), "val_acc": 0.5})
    fig = viz.accuracy_by_epoch(rows)
    assert [t.name for t in fig.data] == ["a / dense", "b / dense"] and list(fig.data[0].y) == [50.0] * 6
    assert [(s.x0, s.x1) for s in fig.layout.shapes] == [(4, 6), (80, 120)]  # what late_gain reads
    assert fig.layout.xaxis.dtick is None  # 120 epochs: automatic ticks, not one label per epoch
    assert viz.accuracy_by_epoch(rows[rows["pilot"] == "a"]).layout.xaxis.dtick == 1


def test_time_split_stacks_each_part_to_the_whole_layers_ratio():
    row = {"threads": 1, "top_k": 1, "experts_ratio": 0.98, "dispatch_ratio": 1.01, "layer_ratio": 1.05}
    fig = viz.time_split({"run A": {"rows": [row, {**row, "top_k": 2, "experts_ratio": 0.8,
                                                       "dispatch_ratio": 0.83, "layer_ratio": 0.85}]}})
    bars = [t for t in fig.data if t.type == "bar"]
    assert [t.name.split(" (")[0] for t in bars] == ["expert FFNs alone", "+ moving rows", "+ routing"]
    assert [round(sum(t.y[i] for t in bars), 3) for i in range(2)] == [1.05, 0.85]
    assert list(bars[0].x) == ["run A<br>1 thr, top-1", "run A<br>1 thr, top-2"]
    assert [t for t in fig.data if t.type == "scatter"][0].text == ("1.050x", "0.850x")
