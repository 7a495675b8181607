"""The explorer's model card (its cache beside the checkpoint, the specialisation verdicts), the router and load plots,
the checkpoint names, the scene and Invert hints, and two browser runs (1400 and 400 px wide) that check what a
researcher sees: the router plot in view on a click, the card's per-layer verdicts, a scene opening the segmentation
checkpoint, the hover readout, stale warnings closed, a stacked phone layout."""
import json
import os
import socket
import threading
from pathlib import Path

import pytest
import timm
import torch
import numpy as np
from PIL import Image, ImageOps

from workbench.analysis import card as cards
from workbench.explorer import example_images, example_scenes_paths
from workbench.moe import moe_modules
from workbench.train.checkpoint import model_config, save_model

EXAMPLE = example_images()[0]
SCENE = example_scenes_paths()[1]
TOKEN_KW = {"moe_layers": "last-2", "num_experts": 4, "shared_expert": "add"}
SEG = "vimoe_seg_micro_patch7_56"
SEG_KW = {"moe_layers": "last-2", "num_experts": 8, "shared_expert": "add", "head": "progressive"}
SHOTS = Path(os.environ.get("WORKBENCH_SHOTS", "")) if os.environ.get("WORKBENCH_SHOTS") else None


def _save_token(folder, seed=0):
    torch.manual_seed(seed)
    model = timm.create_model("vimoe_tiny_patch4_28", **TOKEN_KW)
    save_model(model, model_config("vimoe_tiny_patch4_28", TOKEN_KW), folder)
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("card-ckpt")
    _save_token(root / "token")
    torch.manual_seed(0)
    save_model(timm.create_model(SEG, **SEG_KW), model_config(SEG, SEG_KW), root / "seg")
    dense = timm.create_model("vimoe_tiny_patch4_28", moe_layers="none")
    save_model(dense, model_config("vimoe_tiny_patch4_28", {"moe_layers": "none"}), root / "dense")
    return root


@pytest.fixture
def fake_test(monkeypatch):
    """The card's test replaced by a counted fake (the cache is under test here, not the statistics)."""
    calls = []

    def verdicts(model, config, *, draws=cards.DRAWS, max_images=None, seed=0):
        calls.append((draws, max_images))
        blocks = sorted(k for k in moe_modules(model) if isinstance(k, int))
        return {"test": {"kind": "classes", "dataset": "fashion-mnist", "split": "validation (val_size=10000)",
                         "images": max_images, "max_images": max_images, "draws": draws, "seed": seed,
                         "alpha": 0.05, "correction": "holm", "seen_in_training": True},
                "layers": {str(b): {"nmi": 0.1, "random_nmi": 0.1, "p": 0.5, "p_holm": 1.0, "specialised": False,
                                    "p_balanced": 0.5} for b in blocks}}

    monkeypatch.setattr(cards, "verdicts", verdicts)
    return calls


def test_card_is_written_once_beside_the_checkpoint_and_reused(tmp_path, fake_test):
    folder = _save_token(tmp_path / "m")
    first = cards.model_card(folder, draws=7, max_images=50)
    beside = folder / cards.CARD_FILE
    assert beside.is_file() and first["cached_at"] == str(beside) and len(fake_test) == 1
    stored = json.loads(beside.read_text())
    assert stored["weights_sha256"] == cards.weights_hash(folder) and stored["test"]["draws"] == 7
    assert set(stored["layers"]) == {"4", "5"} and stored["facts"]["num_experts"] == 4
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]  # written atomically: no leftovers
    stamp = beside.stat().st_mtime_ns
    again = cards.model_card(folder, draws=7, max_images=50)
    weaker = cards.model_card(folder, draws=3, max_images=20)  # a card tested harder serves a lighter request
    assert len(fake_test) == 1 and beside.stat().st_mtime_ns == stamp
    assert again["layers"] == weaker["layers"] == first["layers"]
    cards.model_card(folder, draws=20, max_images=50)  # a harder request is tested again and replaces it
    assert len(fake_test) == 2 and json.loads(beside.read_text())["test"]["draws"] == 20


def test_changed_weights_invalidate_the_card(tmp_path, fake_test):
    folder = _save_token(tmp_path / "m")
    first = cards.model_card(folder, draws=5, max_images=40)
    _save_token(folder, seed=1)  # new weights in place
    second = cards.model_card(folder, draws=5, max_images=40)
    assert len(fake_test) == 2 and second["weights_sha256"] != first["weights_sha256"]
    assert json.loads((folder / cards.CARD_FILE).read_text())["weights_sha256"] == second["weights_sha256"]
    cards.model_card(folder, draws=5, max_images=40)
    assert len(fake_test) == 2


def test_a_folder_that_cannot_be_written_caches_in_the_temp_dir(tmp_path, fake_test, monkeypatch):
    folder = _save_token(tmp_path / "ro")
    real_access = os.access
    monkeypatch.setattr(cards.os, "access", lambda p, mode: False if Path(p) == folder.resolve() else
                        real_access(p, mode))
    monkeypatch.setattr(cards.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    card = cards.model_card(folder, draws=5, max_images=40)
    assert not (folder / cards.CARD_FILE).exists()
    assert Path(card["cached_at"]).parent == tmp_path / "tmp" / "vimoe-model-cards"
    cards.model_card(folder, draws=5, max_images=40)
    assert len(fake_test) == 1  # found again in the temp dir
    # a folder whose write fails anyway (a read-only file system: os.access may not know) falls back the same way
    other = _save_token(tmp_path / "rofs", seed=2)
    monkeypatch.setattr(cards.os, "access", real_access)
    real_write = cards.atomic_write_text

    def refuse(path, text):
        if Path(path).parent == other.resolve():
            raise PermissionError(13, "Read-only file system", str(path))
        real_write(path, text)

    monkeypatch.setattr(cards, "atomic_write_text", refuse)
    assert Path(cards.model_card(other, draws=5, max_images=40)["cached_at"]).parent.name == "vimoe-model-cards"


def test_background_cards_answer_at_once_and_fill_in(tmp_path, monkeypatch):
    folder = _save_token(tmp_path / "bg")
    release = threading.Event()
    real = cards.model_card

    def slow(path, **kw):
        release.wait(30)
        return real(path, **kw)

    monkeypatch.setattr(cards, "model_card", slow)
    monkeypatch.setattr(cards, "verdicts", lambda model, config, **kw: {
        "test": {"draws": kw["draws"], "max_images": kw["max_images"], "images": kw["max_images"]},
        "layers": {"5": {"nmi": 0.2, "random_nmi": 0.1, "p": 0.01, "p_holm": 0.02, "specialised": True,
                         "p_balanced": 0.01}}})
    from workbench.train.checkpoint import load_model

    model, config = load_model(folder)
    registry = cards.ModelCards(draws=4, max_images=30)
    state = registry.state(folder, model, config)
    assert state.pending and state.card["layers"] is None and state.card["facts"]["moe_blocks"] == [4, 5]
    assert not registry.join(timeout=0.2)  # the test still runs
    release.set()
    assert registry.join(timeout=60)
    done = registry.wait(folder, model, config, timeout=60)
    assert not done.pending and done.card["layers"]["5"]["specialised"] and done.error is None
    dense, dense_config = load_model(_save_dense(tmp_path / "dense"))
    flat = registry.state(tmp_path / "dense", dense, dense_config)
    assert not flat.pending and flat.card["facts"]["moe_blocks"] == [] and flat.card["layers"] is None
    assert not (tmp_path / "dense" / cards.CARD_FILE).exists()  # nothing to test, nothing cached


def _save_dense(folder):
    save_model(timm.create_model("vimoe_tiny_patch4_28", moe_layers="none"),
               model_config("vimoe_tiny_patch4_28", {"moe_layers": "none"}), folder)
    return folder


def test_the_real_test_gives_a_verdict_per_moe_layer(checkpoints, tmp_path):
    """The project's own random-router test on the validation split (small here: 8 draws, 48 images)."""
    folder = tmp_path / "token"
    folder.mkdir()
    for name in ("model.safetensors", "config.json"):
        (folder / name).write_bytes((checkpoints / "token" / name).read_bytes())
    card = cards.model_card(folder, draws=8, max_images=48)
    assert set(card["layers"]) == {"4", "5"} and card["test"]["kind"] == "classes"
    assert card["test"]["images"] == 48 and card["test"]["split"] == "validation (val_size=10000)"
    for layer in card["layers"].values():
        assert 0 < layer["p"] <= 1 and layer["p"] <= layer["p_holm"] <= 1
        assert layer["specialised"] == (layer["p_holm"] < 0.05)
    assert card["facts"]["accuracy"] == {}  # a config without metrics: nothing invented


def test_checkpoint_names_are_short_distinct_and_moe_first(checkpoints, tmp_path):
    twin = tmp_path / "elsewhere" / "token"
    twin.mkdir(parents=True)
    for name in ("model.safetensors", "config.json"):
        (twin / name).write_bytes((checkpoints / "token" / name).read_bytes())
    choices = cards.checkpoint_choices([checkpoints / "dense", checkpoints / "seg", checkpoints / "token", twin])
    labels = [label for label, _ in choices]
    assert labels[-1] == "dense · dense"  # no metrics in these configs: no accuracy invented
    assert labels[2].startswith("seg · segmentation · top-1/8")
    # same name: the folder above too; a cached card for the very weights adds its verdict count
    assert sorted(label.split(" · ")[0] + " · " + label.split(" · ")[1] for label in labels[:2]) == sorted(
        [f"{checkpoints.name}/token · top-1/4", "elsewhere/token · top-1/4"])
    assert len(set(labels)) == 4 and all(len(label) < 60 for label in labels)
    assert [path for _, path in choices][2] == str(checkpoints / "seg")



def test_checkpoint_labels_carry_accuracy_and_the_cards_verdict_count():
    """The shipped checkpoints' labels: test accuracy from their config and, from a card cached for the same weights,
    how many MoE layers beat random routers (the explorer's default: both)."""
    from workbench.explorer import CHECKPOINTS, DEFAULT_CHECKPOINT

    labels = dict((path, label) for label, path in cards.checkpoint_choices(
        [DEFAULT_CHECKPOINT, CHECKPOINTS / "vimoe_tiny_fmnist", CHECKPOINTS / "vimoe_tiny_fmnist_dense"]))
    assert labels[str(DEFAULT_CHECKPOINT)] == "vimoe_micro_fmnist_scratch · top-2/8 · 78.9% · 2/2 specialised"
    assert labels[str(CHECKPOINTS / "vimoe_tiny_fmnist")] == "vimoe_tiny_fmnist · top-1/8 · 86.2% · 0/2 specialised"
    assert labels[str(CHECKPOINTS / "vimoe_tiny_fmnist_dense")] == "vimoe_tiny_fmnist_dense · dense · 85.0%"


def test_router_plot_is_scaled_to_its_data_with_the_uniform_line_and_the_choice_marked(checkpoints):
    import app

    a = app.EXPLORER.analyse(EXAMPLE, checkpoints / "token")
    fig = app._router_figure(a, 3, 3)
    bars = [t for t in fig.data if t.type == "bar"]
    top = max(max(t.y) for t in bars)
    assert fig.layout.yaxis.range[1] == pytest.approx(top * 1.3) and fig.layout.yaxis.range[1] < 1
    line = [t for t in fig.data if t.type == "scatter"]
    assert len(line) == 1 and list(line[0].y) == [0.25, 0.25] and line[0].name == "1/E"
    assert "1/E = 0.250" in fig.layout.yaxis.title.text
    for i, b in enumerate(a.layers):
        chosen = int(a.experts[b][3, 3])
        assert bars[chosen].marker.line.width[i] == 3 and f"gate {a.gates[b][3, 3]:.2f}" in bars[chosen].text[i]
        assert all(t.marker.line.width[i] == 0 for e, t in enumerate(bars) if e != chosen)
    load = app._load_figure(a)
    assert load.layout.yaxis.title.text == "share of patches (balanced: 1/E = 0.250)"
    assert [t.y[0] for t in load.data if t.type == "scatter"] == [0.25]


def test_scene_through_a_classifier_warns_and_names_the_segmentation_checkpoint(checkpoints, monkeypatch):
    import app

    monkeypatch.setattr(app, "list_checkpoints", lambda: [str(checkpoints / p) for p in ("token", "seg", "dense")])
    with pytest.warns(UserWarning, match="segmentation scenes"):
        out = dict(zip(app.OUTPUTS, app.analyse(SCENE, str(checkpoints / "token"), None, False)))
    assert "Scene on a classifier" in out["status"] and "pick seg in the Checkpoint box" in out["status"]
    assert app._segmentation_checkpoint(str(checkpoints / "token")) == str(checkpoints / "seg")
    assert app._segmentation_checkpoint(str(checkpoints / "seg")) is None  # already segmenting
    quiet = dict(zip(app.OUTPUTS, app.analyse(SCENE, str(checkpoints / "seg"), None, False)))
    assert "Scene on a classifier" not in quiet["status"] and "pixel accuracy" in quiet["status"]
    assert "background" not in quiet["top5"]  # objects only; the background's share is in the panel's title
    assert "background" in app.label_classes(quiet["state"])["label"]


def test_a_dark_object_on_a_light_background_gets_the_invert_hint(checkpoints, tmp_path):
    import app

    photo = tmp_path / "photo.png"
    ImageOps.invert(Image.open(EXAMPLE).convert("L")).resize((90, 60)).save(photo)  # dark on light, not square
    out = dict(zip(app.OUTPUTS, app.analyse(str(photo), str(checkpoints / "token"), None, False)))
    assert "tick Invert" in out["status"]
    ticked = dict(zip(app.OUTPUTS, app.analyse(str(photo), str(checkpoints / "token"), None, True)))
    assert "Invert" not in ticked["status"]
    plain = dict(zip(app.OUTPUTS, app.analyse(EXAMPLE, str(checkpoints / "token"), None, False)))
    assert "Hint" not in plain["status"] and [c[0] for c in plain["layer"]["choices"]] == ["block 4", "block 5"]


def test_the_verdict_beside_the_overlay_follows_the_card():
    import app

    card = cards.CardState({"facts": {"moe_blocks": [4, 5]}, "test": {"draws": 100},
                            "layers": {"4": {"specialised": True, "p_holm": 0.0198},
                                       "5": {"specialised": False, "p_holm": 0.89}}})
    assert "not specialised" in app._verdict_html(card, 5) and cards.NOT_SPECIALISED in app._verdict_html(card, 5)
    assert "verdict yes" in app._verdict_html(card, 4)
    # the banner prints p as the card's table does (two significant figures), not a third digit the table lacks
    assert "p = 0.02 after Holm" in app._verdict_html(card, 4) and "p = 0.89 after Holm" in app._verdict_html(card, 5)
    pending = cards.CardState({"facts": {"moe_blocks": [5]}, "layers": None}, pending=True)
    assert "is running" in app._verdict_html(pending, 5) and "do not read class structure" in \
        app._verdict_html(pending, 5)
    failed = cards.CardState({"facts": {"moe_blocks": [5]}, "layers": None}, error="no dataset")
    assert "could not run (no dataset)" in app._verdict_html(failed, 5)


def test_class_regions_are_striped_and_experts_solid():
    import app
    from workbench.explorer import render_mask

    mask = np.zeros((4, 4), dtype=np.int64)
    mask[1:3, 1:3] = 3
    plain, striped = render_mask(mask, scale=8), render_mask(mask, scale=8, hatch=True)
    background = np.kron(mask == 0, np.ones((8, 8), dtype=bool))
    np.testing.assert_array_equal(striped[background], plain[background])  # the background stays black
    region = striped[8:24, 8:24].reshape(-1, 3)
    assert len(np.unique(region, axis=0)) == 2  # the class colour and its darker stripe, nothing else
    assert 0.15 < (striped != plain).any(-1)[8:24, 8:24].mean() < 0.35
    a = type("A", (), {"class_names": ("background", "a", "b"), "mask": mask % 3, "truth": None, "scores": None})
    chips = app._class_legend_html(a)
    assert chips.count("repeating-linear-gradient") == 2  # the two classes striped, the background not


# ---------------------------------------------------------------------------------------------------- the browser
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture(scope="module")
def served(checkpoints):
    import app

    with pytest.MonkeyPatch.context() as mp:
        listed = [str(checkpoints / p) for p in ("dense", "seg", "token")]
        mp.setattr(app, "list_checkpoints", lambda: listed)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        demo = app.build_app(checkpoints / "token")
        demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, share=False, quiet=True)
        yield f"http://127.0.0.1:{port}/"
        demo.close()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if not Path("/usr/bin/chromium").is_file():
        pytest.skip("Debian's chromium (/usr/bin/chromium) is not installed (make setup installs it)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=ARGS)
        yield b
        b.close()


def _shot(page, tmp_path, name, full=False):
    path = (SHOTS or tmp_path) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=full)
    return path


def _in_view(page, selector) -> dict:
    return page.evaluate("""(sel) => { const r = document.querySelector(sel).getBoundingClientRect();
        return {top: r.top, bottom: r.bottom, left: r.left, right: r.right, height: r.height,
                inside: r.top >= -1 && r.bottom <= window.innerHeight + 1 && r.left >= 0
                    && r.right <= window.innerWidth};
        }""", selector)


def _pick_example_and_click(page, index=3, from_top=False):
    """Pick an example, then click patch (0, 0) of the overlay; ``from_top``: with the page scrolled to its top
    (a desktop screen), where the overlay must be whole in view before the click."""
    page.locator("#examples img").nth(index).click()
    try:
        page.locator("#status").get_by_text("patch grid").wait_for(timeout=120_000)
    except Exception as err:  # say what the app showed instead
        raise AssertionError(f"no 'patch grid' after the example: status reads {page.locator('#status').inner_text()!r}") from err
    overlay = page.locator("#overlay img").first
    overlay.wait_for(state="visible", timeout=120_000)  # generous: other work may share the CPU
    page.wait_for_timeout(500)  # the card and verdict settle
    if from_top:
        page.evaluate("window.scrollTo(0, 0)")
        assert _in_view(page, "#overlay img")["inside"]
    src = overlay.get_attribute("src")
    box = overlay.bounding_box()
    overlay.click(position={"x": box["width"] * 0.1, "y": box["height"] * 0.1})  # patch (0, 0) of 7x7
    page.wait_for_function("src => document.querySelector('#overlay img').src !== src", arg=src, timeout=120_000)
    try:
        page.locator("#router-plot").get_by_text("Router distribution of patch (row 1 of 7, col 1 of 7)").wait_for(timeout=120_000)
    except Exception as err:  # say what the plot showed instead
        raise AssertionError(f"the router plot did not show patch (0, 0): it reads "
                             f"{page.locator('#router-plot').inner_text()[:200]!r}") from err
    page.wait_for_timeout(500)  # the scroll after the click (phones) and the plot's redraw


def test_browser_1400_router_in_view_card_verdicts_hover_scene_and_warnings(served, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(served)
    # a blank image warns; a later good image closes that warning
    blank = tmp_path / "blank.png"
    Image.new("RGBA", (40, 40), (0, 0, 0, 0)).save(blank)
    page.locator("#upload input[type=file]").set_input_files(str(blank))
    page.locator("#status").get_by_text("fully transparent").wait_for(timeout=60_000)
    page.locator(".toast-body.warning").first.wait_for(timeout=10_000)
    _pick_example_and_click(page, from_top=True)
    router = _in_view(page, "#router-plot")
    scroll = page.evaluate("window.scrollY")
    page.wait_for_timeout(800)
    stale = page.locator(".toast-body.warning").count()
    # the card: every MoE layer's verdict, once the background test reports (small test here: conftest)
    page.locator("#card-verdicts tr.no, #card-verdicts tr.yes").nth(1).wait_for(timeout=240_000)
    rows = page.locator("#card-verdicts tr").all_inner_texts()
    card = page.locator("#card").inner_text()
    note = page.locator("#verdict .verdict").inner_text()
    # hover readout
    box = page.locator("#overlay img").first.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.95, box["y"] + box["height"] * 0.05)
    page.locator("#readout").get_by_text("Hover: patch (row 1 of 7, col 7 of 7)").wait_for(timeout=5_000)
    hover = page.locator("#readout").inner_text()
    shot = _shot(page, tmp_path, "explorer-1400-click.png")
    _shot(page, tmp_path, "explorer-1400-full.png", full=True)
    # a scene picked while the classifier is loaded opens the segmentation checkpoint
    page.locator("#scenes img").nth(1).click()
    page.locator("#status").get_by_text("pixel accuracy").wait_for(timeout=60_000)
    chosen = page.locator("#checkpoint input").input_value()
    seg_panels = page.locator("#segmentation figure img").count()
    _shot(page, tmp_path, "explorer-1400-scene.png", full=True)
    # changing the checkpoint analyses the image again: the scene through the classifier warns
    page.locator("#checkpoint input").click()
    page.locator("li.item", has_text="token · top-1").first.click()
    page.locator("#status").get_by_text("Scene on a classifier").wait_for(timeout=60_000)
    timer_hidden = page.evaluate("""() => { const d = document.createElement('div'); d.className = 'progress-text';
        document.body.appendChild(d); return getComputedStyle(d).display === 'none'; }""")
    page.close()
    assert router["inside"] and scroll == 0, (router, scroll)  # beside the overlay, nothing scrolled
    assert stale == 0  # the blank image's warning closed once a good image was analysed
    assert [r.split("\t")[0].strip() for r in rows[1:]] == ["4", "5"]
    assert all("specialised" in r for r in rows[1:])
    assert "E = 4 experts, top-1" in card and "blocks 4, 5 of 0-5" in card and "shared expert (add)" in card
    assert "Block 5" in note and ("not specialised" in note or "specialised" in note)
    assert "expert" in hover and "gate" in hover
    assert chosen.startswith("seg · segmentation") and seg_panels == 3
    assert timer_hidden  # no "processing | 2.2/0.1s"
    assert shot.stat().st_size > 10_000


def test_browser_400_stacks_and_keeps_the_router_plot_in_view(served, browser, tmp_path):
    import app

    assert app.CARDS.join(timeout=300)  # the cards the previous test started are tested, not competing for the CPU
    page = browser.new_page(viewport={"width": 400, "height": 900})
    page.goto(served)
    _pick_example_and_click(page)
    router = _in_view(page, "#router-plot")
    overlay = _in_view(page, "#overlay img")
    shot = _shot(page, tmp_path, "explorer-400-click.png")
    load = _in_view(page, "#load-plot")
    card = _in_view(page, "#card")
    wide = page.evaluate("document.documentElement.scrollWidth")
    title_clipped = page.evaluate("""() => { const t = document.querySelector('#router-plot .gtitle');
        const p = document.querySelector('#router-plot').getBoundingClientRect();
        return !t || t.getBoundingClientRect().right > p.right; }""")
    _shot(page, tmp_path, "explorer-400-full.png", full=True)
    page.close()
    assert router["inside"], router  # the click shows the router plot without scrolling by hand
    assert overlay["bottom"] > 0 and overlay["height"] > 250  # the overlay still on screen, full size
    assert router["right"] - router["left"] > 300 and load["right"] - load["left"] > 300  # stacked, not squeezed
    assert card["top"] > router["bottom"] and wide <= 400 and not title_clipped
    assert shot.stat().st_size > 10_000


def test_card_of_a_mistyped_path_names_the_problem(checkpoints, tmp_path):
    import app

    body, verdict, _ = app.refresh_card(str(tmp_path / "vimoe_tiny_fmnst"), None)
    assert "No model card" in body and "does not exist" in body and "Model card: vimoe_tiny_fmnst" not in body
    assert verdict == ""
    fresh = _save_token(tmp_path / "fresh")  # a real folder that no test has loaded: its card waits for a route
    body, _, _ = app.refresh_card(str(fresh), None)
    assert "Route an image with this checkpoint to load it" in body
