"""The routing explorer on segmentation checkpoints: predicted masks, an example scene's ground truth and scores, the
class palette, the app's panels and legend (driven directly, with gradio_client, and in a browser), classifiers
unchanged."""
import base64
import io
import itertools
import logging
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from workbench.train.checkpoint import model_config, save_model
from workbench.viz.class_palette import CLASS_COLORS, class_rgb_array
from workbench.explorer import (SCENES, BadImage, Explorer, example_images, example_scenes_paths, mask_scores,
                                render_mask)
from workbench.viz.palette import EXPERT_COLORS, SHARED_COLOR, hex_rgb
from workbench.data.scenes import SCENE_CLASSES

SEG = "vimoe_seg_micro_patch7_56"
SEG_KWARGS = {"moe_layers": "last-2", "num_experts": 8, "shared_expert": "add", "head": "progressive"}
SCENE = example_scenes_paths()[1]  # five classes: background, T-shirt/top, Pullover, Coat, Shirt
EXAMPLE = example_images()[0]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg-ckpt")
    torch.manual_seed(0)
    seg = timm.create_model(SEG, **SEG_KWARGS)
    save_model(seg, model_config(SEG, SEG_KWARGS), root / "seg")
    dense = timm.create_model(SEG, moe_layers="none")
    save_model(dense, model_config(SEG, {"moe_layers": "none"}), root / "dense")
    token = timm.create_model("vimoe_tiny_patch4_28", moe_layers="last-2", num_experts=4, shared_expert="add")
    token_config = model_config("vimoe_tiny_patch4_28", {"moe_layers": "last-2", "num_experts": 4,
                                                         "shared_expert": "add"})
    save_model(token, token_config, root / "token")
    save_model(token, model_config(SEG, SEG_KWARGS), root / "mismatch")  # a classifier's weights, a seg config
    save_model(timm.create_model("resnet10t", num_classes=11), model_config("resnet10t", {"num_classes": 11}),
               root / "resnet")
    return root


def _lab(rgb):
    """CIELAB (D65) of an sRGB triple in 0..255."""
    c = np.asarray(rgb, dtype=float) / 255
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    t = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ c
    t = t / np.array([0.95047, 1.0, 1.08883])
    f = np.where(t > 0.008856, np.cbrt(t), 7.787 * t + 16 / 116)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def _by_hand(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(pixel accuracy, mIoU over the classes in either mask), straight from the arrays."""
    classes = np.union1d(np.unique(pred), np.unique(truth))
    ious = [((pred == c) & (truth == c)).sum() / ((pred == c) | (truth == c)).sum() for c in classes]
    return float((pred == truth).mean()), float(sum(ious) / len(ious))


def _answer(explorer: Explorer, checkpoint, mask: np.ndarray) -> None:
    """Make the checkpoint's model predict ``mask``, whatever the image: its logits become the mask's one-hot."""
    model, _, _ = explorer.model(checkpoint)
    logits = torch.nn.functional.one_hot(torch.tensor(mask).long(), 11).permute(2, 0, 1)[None].float()
    model.register_forward_hook(lambda module, args, out: logits)


def test_class_palette_stands_apart_from_black_each_other_and_the_experts():
    labs = [_lab(hex_rgb(c)) for c in CLASS_COLORS[1:]]
    assert CLASS_COLORS[0] == "#000000" and len(CLASS_COLORS) == len(SCENE_CLASSES)
    assert all(lab[0] >= 40 for lab in labs), "a class colour is too dark to tell from the black background"
    assert min(np.linalg.norm(a - b) for a, b in itertools.combinations(labs, 2)) >= 35
    experts = [_lab(hex_rgb(c)) for c in EXPERT_COLORS + (SHARED_COLOR,)]
    assert min(np.linalg.norm(a - b) for a in labs for b in experts) >= 15, "a class colour reads as an expert's"
    mask = np.array([[0, 1, 10], [11, 255, -1]])
    rgb = class_rgb_array(mask, num_classes=11)
    assert tuple(rgb[0, 0]) == (0, 0, 0) and tuple(rgb[0, 2]) == hex_rgb(CLASS_COLORS[10])
    assert tuple(rgb[1, 0]) == tuple(rgb[1, 1]) == tuple(rgb[1, 2]) == (255, 255, 255)  # outside the classes
    assert tuple(class_rgb_array(np.array([11]))[0]) == hex_rgb(CLASS_COLORS[1])  # beyond 11: colours repeat
    assert render_mask(np.array([[0, 3]]), scale=4).shape == (4, 8, 3)


def test_example_scenes_ship_with_their_ground_truth():
    from workbench.data.scenes import example_scenes

    scenes = example_scenes_paths()
    assert [Path(p).name for p in scenes] == [f"scene_{i:02d}.png" for i in range(6)]
    assert not set(scenes) & set(example_images())  # classifiers' examples stay the Fashion-MNIST images
    images, masks = example_scenes(6)
    for path, image, mask in zip(scenes, images.numpy(), masks.numpy()):
        with Image.open(path) as im, Image.open(Path(path).with_suffix(".mask.png")) as truth:
            assert im.mode == truth.mode == "L" and im.size == truth.size == (56, 56)
            np.testing.assert_array_equal(np.asarray(im), image[0])
            np.testing.assert_array_equal(np.asarray(truth), mask)


def test_explorer_predicts_a_mask_of_the_input_size(checkpoints, tmp_path):
    ex = Explorer()
    rgb = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 100, 3), dtype=np.uint8)).save(rgb)
    for path in (EXAMPLE, str(rgb)):  # 28x28 and 100x60: resized to the model's 56x56 view, as for classifiers
        a = ex.analyse(path, checkpoints / "seg")
        assert a.task == "segmentation" and a.seen.shape == (56, 56) and a.class_names == SCENE_CLASSES
        assert a.mask.shape == (56, 56) and a.mask.min() >= 0 and a.mask.max() < 11
        assert a.truth is None and a.scores is None
        assert a.layers == [2, 3] and a.grid == (8, 8) and a.probs[3].shape == (8, 8, 8)
        counts = np.bincount(a.mask.reshape(-1), minlength=11) / a.mask.size
        assert a.top5 == a.class_share == {SCENE_CLASSES[c]: counts[c] for c in np.argsort(-counts, kind="stable")
                                           if counts[c] > 0}
        assert abs(sum(a.class_share.values()) - 1) < 1e-9
    dense = ex.analyse(SCENE, checkpoints / "dense")
    assert dense.layers == [] and dense.mask.shape == (56, 56) and dense.truth is not None
    classifier = ex.analyse(SCENE, checkpoints / "token")  # a scene through a classifier: its top-5, no masks
    assert classifier.task == "classification" and len(classifier.top5) == 5 and classifier.mask is None


def test_example_scene_is_scored_against_its_ground_truth(checkpoints, tmp_path):
    truth = np.asarray(Image.open(Path(SCENE).with_suffix(".mask.png")))
    wrong = truth.copy()
    wrong[:, :28][wrong[:, :28] > 0] = 4  # every item pixel of the left half called a Dress
    wrong[:4] = 2  # and the top rows Trousers
    for answer in (truth, wrong):
        ex = Explorer()
        _answer(ex, checkpoints / "seg", answer)
        a = ex.analyse(SCENE, checkpoints / "seg")
        np.testing.assert_array_equal(a.truth, truth)
        np.testing.assert_array_equal(a.mask, answer)
        acc, miou = _by_hand(answer, truth)
        assert a.scores["pixel_acc"] == pytest.approx(acc, rel=1e-12)
        assert a.scores["miou"] == pytest.approx(miou, rel=1e-12)
    assert acc < 0.95 and miou < 0.8  # the wrong answer scores what it should, not 1
    copy = tmp_path / "upload.png"  # an upload (or Gradio's cached copy) of a shipped scene finds its ground truth
    copy.write_bytes(Path(SCENE).read_bytes())
    np.testing.assert_array_equal(ex.analyse(copy, checkpoints / "seg").truth, truth)


def test_mask_scores_follow_the_trainers_convention():
    truth = np.array([[0, 0, 1, 1], [0, 0, 1, 1]])
    pred = np.array([[0, 0, 1, 2], [0, 1, 1, 1]])
    s = mask_scores(pred, truth, 11)
    assert s["pixel_acc"] == 6 / 8
    assert s["miou"] == pytest.approx((3 / 4 + 3 / 5 + 0 / 1) / 3)  # classes 0, 1 and the predicted 2; not 3..10
    assert s["iou"][3] is None


def test_broken_ground_truth_is_a_one_line_message(checkpoints, tmp_path):
    image = tmp_path / "scene.png"
    image.write_bytes(Path(SCENE).read_bytes())
    (tmp_path / "scene.mask.png").write_bytes(b"not a png")
    with pytest.raises(BadImage, match="ground truth scene.mask.png cannot be read: rewrite") as info:
        Explorer().analyse(image, checkpoints / "seg")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("ckpt, message", [("mismatch", "holds weights of another architecture"),
                                           ("resnet", "is not a ViT/ViMoE checkpoint")])
def test_checkpoint_of_another_architecture_is_refused_in_one_line(checkpoints, ckpt, message, caplog, capfd):
    import app

    with caplog.at_level(logging.INFO, logger="workbench.app"), pytest.warns(UserWarning):
        out = app.analyse(SCENE, str(checkpoints / ckpt), None, False)
    status = out[app.OUTPUTS.index("status")]
    assert message in status and "\n" not in status.strip() and len(status) < 300
    assert "Traceback" not in "".join(capfd.readouterr())


def _panels(html):
    """(caption, decoded PNG) of each panel of the gallery HTML."""
    found = re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="([^"]+)"', html)
    return [(alt, np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))) for data, alt in found]


def test_app_shows_masks_beside_the_experts_for_a_segmentation_checkpoint(checkpoints):
    import app

    out = dict(zip(app.OUTPUTS, app.analyse(SCENE, str(checkpoints / "seg"), None, False)))
    a = out["state"]
    assert a.task == "segmentation" and out["layer"]["value"] == "3"
    objects = {k: v for k, v in a.class_share.items() if k != "background"}  # the class panel: objects only
    assert out["top5"] == pytest.approx({k: v / sum(objects.values()) for k, v in objects.items()})
    assert "Segmentation model (11 classes)" in out["status"] and "8x8 patch grid" in out["status"]
    acc, miou = a.scores["pixel_acc"], a.scores["miou"]
    assert f"pixel accuracy {acc:.1%}, mIoU {miou:.1%}" in out["status"]
    panels = _panels(out["layers"])
    assert [alt for alt, _ in panels] == ["ground truth", "prediction", "experts, block 3", "block 2", "block 3"]
    scale = int(np.ceil(app.PANEL_PX / 56))
    np.testing.assert_array_equal(panels[0][1], render_mask(a.truth, scale, hatch=True))  # classes striped
    np.testing.assert_array_equal(panels[1][1], render_mask(a.mask, scale, hatch=True))
    np.testing.assert_array_equal(panels[2][1], panels[4][1])  # the selected layer's experts, as in its panel
    legend = re.search(r'<div id="class-legend".*?</div>', out["layers"]).group(0)
    assert all(name in legend for name in SCENE_CLASSES) and "IoU" in legend
    assert "expert 7" in out["legend"]  # the expert legend beside the overlay is the experts' own
    expert_legend = re.search(r'<div id="seg-expert-legend".*?</div>', out["layers"]).group(0)
    assert "expert 7" in expert_legend  # and the experts panel beside the masks has its own
    upload = app.analyse(EXAMPLE, str(checkpoints / "seg"), "2", False)
    assert "No ground truth for this image" in upload[app.OUTPUTS.index("status")]
    assert [alt for alt, _ in _panels(upload[app.OUTPUTS.index("layers")])][:2] == ["prediction", "experts, block 2"]
    overlay, layers, readout, _ = app.show_layer(a, "2", "plain", None)  # another layer: the experts beside the masks follow
    assert Path(overlay).is_file() and [alt for alt, _ in _panels(layers)][2] == "experts, block 2"
    label = app.label_classes(a)
    assert label["label"].startswith(app.SHARE_LABEL) and "background" in label["label"]
    assert label["num_top_classes"] == 10
    dense = dict(zip(app.OUTPUTS, app.analyse(SCENE, str(checkpoints / "dense"), None, False)))
    assert "dense (no MoE layers)" in dense["status"] and "only its mask" in dense["status"]
    assert [alt for alt, _ in _panels(dense["layers"])] == ["ground truth", "prediction"]


def test_app_outputs_for_a_classifier_are_unchanged(checkpoints):
    import gradio as gr

    import app

    out = dict(zip(app.OUTPUTS, app.analyse(EXAMPLE, str(checkpoints / "token"), None, False)))
    assert len(out["top5"]) == 5 and "Segmentation" not in out["status"] and "7x7 patch grid" in out["status"]
    assert [alt for alt, _ in _panels(out["layers"])] == ["block 4", "block 5"]
    assert "segmentation" not in out["layers"] and "class-legend" not in out["layers"]
    assert out["layers"].startswith('<div><div style="font-weight:600;margin-bottom:4px">All MoE layers</div>')
    assert app.show_layer(out["state"], "4", "gate", None)[1] == gr.skip()  # the gallery is left as it is
    label = app.label_classes(out["state"])
    assert label["label"] == app.TOP5_LABEL and label["num_top_classes"] == 5


def test_scenes_appear_in_the_example_gallery(checkpoints):
    import app

    demo = app.build_app(checkpoints / "seg")
    galleries = {c["props"].get("elem_id"): [Path(item["image"]["path"]).name for item in c["props"]["value"]]
                 for c in demo.config["components"] if c.get("type") == "gallery"}
    assert [Path(p).name for p in example_scenes_paths()] == [f"scene_{i:02d}.png" for i in range(6)]
    assert len(galleries["scenes"]) == 6
    assert not any(name.startswith("scene_") for name in galleries["examples"])
    assert all(Path(p).parent == SCENES for p in example_scenes_paths())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(checkpoints):
    import app

    port = _free_port()
    demo = app.build_app(checkpoints / "seg")
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, share=False, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def test_app_api_keeps_its_outputs_for_a_segmentation_checkpoint(served, checkpoints):
    from gradio_client import Client, handle_file

    client = Client(served, verbose=False)
    out = client.predict(handle_file(SCENE), str(checkpoints / "seg"), None, False, "gate", api_name="/analyse")
    seen, classes, layer, overlay, layers, load_plot, router_plot, legend, status = out
    assert Path(seen).is_file() and Path(overlay).is_file() and layer["value"] == "3"
    assert abs(sum(c["confidence"] for c in classes["confidences"]) - 1) < 1e-6
    assert "pixel accuracy" in status and 'id="segmentation"' in layers and 'alt="ground truth"' in layers


def test_browser_example_scene_shows_masks_and_class_legend(served, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if not Path("/usr/bin/chromium").is_file():
        pytest.skip("Debian's chromium (/usr/bin/chromium) is not installed (make setup installs it)")

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        page = browser.new_page(viewport={"width": 1400, "height": 1400})
        page.goto(served)
        page.locator("#scenes img").nth(1).click()
        page.locator("#status").get_by_text("pixel accuracy").wait_for(timeout=60_000)
        page.locator("#segmentation figure img[alt='prediction']").wait_for(state="visible", timeout=30_000)
        shown = {alt: page.locator(f"#segmentation figure img[alt='{alt}']").is_visible()
                 for alt in ("ground truth", "prediction", "experts, block 3")}
        legend = page.locator("#class-legend").inner_text()
        page.get_by_text("Objects in the predicted mask (share of object pixels)").wait_for(timeout=30_000)
        shot = tmp_path / "segmentation.png"
        page.screenshot(path=str(shot), full_page=True)
        errors = page.locator(".error, .toast-body.error").count()
        browser.close()
    assert all(shown.values()), shown
    assert all(name in legend for name in SCENE_CLASSES)
    assert errors == 0 and shot.stat().st_size > 10_000
