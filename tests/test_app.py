"""The routing explorer: image decoding, the palette and overlays, the Gradio app driven with gradio_client, and
one browser run."""
import base64
import io
import itertools
import logging
import os
import re
import socket
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from workbench.train.checkpoint import CheckpointError, model_config, save_model
from workbench.explorer import BadImage, Explorer, example_images, read_image, render_overlay, to_model_input
from workbench.viz.palette import EXPERT_COLORS, SHARED_COLOR, expert_rgb

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = example_images()[0]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    token = timm.create_model("vimoe_tiny_patch4_28", moe_layers="last-2", num_experts=4, shared_expert="add")
    save_model(token, model_config("vimoe_tiny_patch4_28", {"moe_layers": "last-2", "num_experts": 4,
                                                            "shared_expert": "add"}), root / "token")
    image = timm.create_model("vimoe_tiny_patch4_28", moe_layers="last-2", num_experts=4, routing="image")
    save_model(image, model_config("vimoe_tiny_patch4_28", {"moe_layers": "last-2", "num_experts": 4,
                                                            "routing": "image"}), root / "image")
    rgb = timm.create_model("vimoe_tiny_patch4_28", moe_layers="last-1", num_experts=2, in_chans=3, img_size=32)
    save_model(rgb, model_config("vimoe_tiny_patch4_28", {"moe_layers": "last-1", "num_experts": 2, "in_chans": 3,
                                                          "img_size": 32}), root / "rgb")
    dense = timm.create_model("vimoe_tiny_patch4_28", moe_layers="none")
    save_model(dense, model_config("vimoe_tiny_patch4_28", {"moe_layers": "none"}), root / "dense")
    (root / "run" / "model").mkdir(parents=True)  # a training run's folder: the model sits in model/
    save_model(token, model_config("vimoe_tiny_patch4_28", {"moe_layers": "last-2", "num_experts": 4,
                                                            "shared_expert": "add"}), root / "run" / "model")
    (root / "notes.txt").write_text("not a checkpoint\n")
    (root / "broken").mkdir()
    (root / "broken" / "model.safetensors").write_bytes(b"garbage")
    (root / "broken" / "config.json").write_text('{"model": "vimoe_tiny_patch4_28", "model_kwargs": {}}')
    return root


def _write(tmp_path, name, img: Image.Image, **kw) -> str:
    path = tmp_path / name
    img.save(path, **kw)
    return str(path)


@pytest.mark.parametrize("fmt, mode", [("PNG", "L"), ("PNG", "RGBA"), ("JPEG", "RGB"), ("WEBP", "RGB"),
                                       ("PNG", "P"), ("PNG", "LA")])
def test_formats_and_modes_decode(tmp_path, fmt, mode):
    img = Image.new(mode, (40, 30))
    path = _write(tmp_path, f"x.{fmt.lower()}", img, format=fmt)
    x, seen = to_model_input(read_image(path), {"input_size": (1, 28, 28), "mean": (0.5,), "std": (0.5,)})
    assert x.shape == (1, 1, 28, 28) and seen.shape == (28, 28)


def test_gif_first_frame(tmp_path):
    frames = [Image.new("L", (20, 20), 255), Image.new("L", (20, 20), 0)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    _, seen = to_model_input(read_image(path), {"input_size": (1, 28, 28), "mean": (0.5,), "std": (0.5,)})
    assert seen.max() > 0.9  # the white first frame, not the black second one


@pytest.mark.parametrize("content, message", [
    (b"", "empty"), (b"hello, I am text", "not an image"),
])
def test_bad_files(tmp_path, content, message):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(BadImage, match=message):
        read_image(path)


def test_truncated_and_tiny_images(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.randint(0, 255, (64, 64), dtype=np.uint8)).save(buf, format="PNG")
    path = tmp_path / "truncated.png"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(BadImage, match="corrupt or truncated"):
        read_image(path)
    with pytest.raises(BadImage, match="too small"):
        read_image(_write(tmp_path, "one.png", Image.new("L", (1, 1))))


def test_very_large_images(tmp_path):
    big = _write(tmp_path, "big.png", Image.new("L", (6000, 5000), 128))
    img = read_image(big)
    assert max(img.size) <= 1024  # decoded, then reduced before preprocessing
    header = tmp_path / "bomb.png"  # a valid header that claims 100000 x 100000 pixels
    small = io.BytesIO()
    Image.new("L", (1, 1)).save(small, format="PNG")
    data = bytearray(small.getvalue())
    data[16:24] = (100000).to_bytes(4, "big") + (100000).to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # keep the IHDR chunk's CRC valid
    header.write_bytes(bytes(data))
    with pytest.raises(BadImage, match="megapixels"):
        read_image(header)


def test_explorer_analysis(checkpoints):
    ex = Explorer()
    a = ex.analyse(EXAMPLE, checkpoints / "token")
    assert a.layers == [4, 5] and a.routing == "token" and len(a.top5) == 5
    assert a.experts[5].shape == (7, 7) and a.probs[5].shape == (7, 7, 4)
    assert a.overlay(5, scale=8).shape == (56, 56, 3)
    assert all(abs(v.sum() - 1) < 1e-6 for v in a.load().values())
    assert a.patch_at(223, 0, 224, 224) == (0, 6)
    img = ex.analyse(EXAMPLE, checkpoints / "image")
    assert img.routing == "image" and img.experts[4].shape == (1, 1)
    rgb = ex.analyse(EXAMPLE, checkpoints / "rgb")
    assert rgb.seen.shape == (32, 32, 3) and rgb.experts[5].shape == (8, 8)


def _lab(rgb):
    """CIELAB (D65) of an sRGB triple in 0..255."""
    c = np.asarray(rgb, dtype=float) / 255
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    t = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ c
    t = t / np.array([0.95047, 1.0, 1.08883])
    f = np.where(t > 0.008856, np.cbrt(t), 7.787 * t + 16 / 116)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def test_palette_colours_stand_apart_from_black_grey_and_each_other():
    labs = [_lab(expert_rgb(e)) for e in range(len(EXPERT_COLORS))]
    assert all(lab[0] >= 45 for lab in labs), "an expert colour is too dark to tell from a black background"
    assert all(np.hypot(lab[1], lab[2]) >= 25 for lab in labs), "an expert colour is too grey (the shared expert)"
    gaps = [np.linalg.norm(a - b) for a, b in itertools.combinations(labs, 2)]
    assert min(gaps) >= 25, "two expert colours are too close to tell apart"
    assert np.linalg.norm(_lab(expert_rgb(0)) - _lab((0, 0, 0))) >= 45
    assert SHARED_COLOR not in EXPERT_COLORS


def test_overlay_colours_match_the_legend_and_frame_the_picked_patch():
    experts = np.arange(16).reshape(4, 4)
    black = np.zeros((28, 28), np.float32)
    plain = render_overlay(black, experts, scale=10)
    assert plain.shape == (40, 40, 3)
    for e in range(16):  # opaque over black: exactly the legend colour (patch centres, away from the grid lines)
        r, c = divmod(e, 4)
        assert tuple(plain[r * 10 + 5, c * 10 + 5]) == expert_rgb(e)
    gates = np.linspace(0.1, 1.0, 16).reshape(4, 4)
    faded = render_overlay(black, experts, gates, scale=10).astype(float)
    for e in range(16):  # by gate: a lighter tint of the same colour, never darker (no olive yellow, brown orange)
        r, c = divmod(e, 4)
        px, legend = faded[r * 10 + 5, c * 10 + 5], np.array(expert_rgb(e), float)
        assert np.all(px >= legend - 1)
        share = (255 - px) / np.maximum(255 - legend, 1e-9)
        assert np.ptp(share[legend < 250]) < 0.03  # every channel faded by the same share: the same hue
    assert tuple(faded[35, 35]) == expert_rgb(15)  # the largest gate is drawn at full strength
    picked = render_overlay(black, experts, scale=10, picked=(1, 2))
    changed = np.argwhere(np.any(picked != plain, axis=-1))
    assert changed.min(0).tolist() == [10, 20] and changed.max(0).tolist() == [19, 29]  # only inside that patch
    assert tuple(picked[10, 25]) == (0, 0, 0) and tuple(picked[12, 25]) == (255, 255, 255)
    bright = render_overlay(np.ones((28, 28), np.float32), experts, scale=10)
    assert np.all(bright[5, 5].astype(int) > np.array(expert_rgb(0)))  # the image shows through as a light veil


@pytest.mark.parametrize("img, problem", [
    (Image.new("RGBA", (30, 30), (200, 10, 10, 0)), "fully transparent"),
    (Image.new("L", (30, 30), 140), "one flat colour"),
])
def test_images_without_visible_content_are_flagged(checkpoints, tmp_path, img, problem):
    a = Explorer().analyse(_write(tmp_path, "blank.png", img), checkpoints / "token")
    assert a.warning and problem in a.warning and len(a.top5) == 5
    assert Explorer().analyse(EXAMPLE, checkpoints / "token").warning is None


def test_checkpoint_problems_are_one_line_messages(checkpoints, tmp_path):
    ex = Explorer()
    cases = [(checkpoints / "notes.txt", "notes.txt is not a workbench checkpoint"),
             (EXAMPLE, "is not a workbench checkpoint"), (tmp_path, "is not a model folder"),
             (tmp_path / "nope", "does not exist"), ("", "no checkpoint given")]
    for path, message in cases:
        with pytest.raises(CheckpointError, match=message) as info:
            ex.model(path)
        text = str(info.value)
        assert "\n" not in text and len(text) <= 200 and "weights_only" not in text and "delete it" not in text
    with pytest.raises(CheckpointError) as info:
        ex.model(checkpoints / "broken")
    assert "\n" not in str(info.value) and len(str(info.value)) <= 200
    assert ex.analyse(EXAMPLE, checkpoints / "run").layers == [4, 5]  # a run folder resolves to its model/
    dense = ex.analyse(EXAMPLE, checkpoints / "dense")
    assert dense.layers == [] and len(dense.top5) == 5 and dense.grid == (0, 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(checkpoints):
    import app

    port = _free_port()
    demo = app.build_app(checkpoints / "token")
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, share=False, quiet=True)
    from gradio_client import Client

    yield f"http://127.0.0.1:{port}/", Client(f"http://127.0.0.1:{port}/", verbose=False)
    demo.close()


def _predict(client, path, ckpt, layer=None, mode="gate"):
    from gradio_client import handle_file

    return client.predict(handle_file(str(path)), str(ckpt), layer, False, mode, api_name="/analyse")


def _skipped(output) -> bool:
    """Whether gradio_client got "left as it was" for an output (an update carrying no value)."""
    return isinstance(output, dict) and output.get("__type__") == "update" and "value" not in output \
        and "value" not in output.get("props", {})


def _panels(html):
    """(caption, decoded PNG) of each panel of the "All MoE layers" HTML."""
    found = re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="([^"]+)"', html)
    return [(alt, np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))) for data, alt in found]


def test_app_predicts_an_example(served, checkpoints):
    import app

    _, client = served
    out = _predict(client, EXAMPLE, checkpoints / "token")
    seen, top5, layer, overlay, layers, load_plot, router_plot, legend, status = out
    assert len(top5["confidences"]) == 5 and layer["value"] == "5"
    assert Path(overlay).is_file() and Path(seen).is_file()
    assert "expert 3" in legend and "7x7 patch grid" in status and "Warning" not in status
    a = Explorer().analyse(EXAMPLE, checkpoints / "token")
    panels = _panels(layers)  # every layer's whole overlay, with its caption, inline at full size
    assert [alt for alt, _ in panels] == ["block 4", "block 5"] and "block 4</figcaption>" in layers
    for (_, png), b in zip(panels, a.layers):
        np.testing.assert_array_equal(png, a.overlay(b, scale=app._scale(a, app.PANEL_PX)))
    assert "image-rendering:pixelated" in layers and "height:auto" in layers
    middle = np.asarray(Image.open(overlay).convert("RGB"))
    plain = np.asarray(Image.open(_predict(client, EXAMPLE, checkpoints / "token", mode="plain")[3]).convert("RGB"))
    assert middle.shape == plain.shape and not np.array_equal(middle, plain)  # the opaque mode draws differently
    np.testing.assert_array_equal(plain, a.overlay(5, scale=app._scale(a, app.OVERLAY_PX), use_gates=False,
                                                   picked=(3, 3)))  # opaque, the shown patch framed
    image = _predict(client, EXAMPLE, checkpoints / "image")
    assert "Image-level routing" in image[-1]
    # an API client may name the layer on its first request, before the page has any layer choices
    first = _predict(client, EXAMPLE, checkpoints / "token", layer="4")
    assert first[2]["value"] == "4" and first[4] == layers
    unknown = _predict(client, EXAMPLE, checkpoints / "token", layer="9")
    assert unknown[2]["value"] == "5"  # not a MoE block of this checkpoint: its last MoE layer


def test_identical_outputs_are_written_once(checkpoints):
    """Identical outputs are shared finished files, never rewritten in place (what lost concurrent downloads)."""
    import app

    first = app.analyse(EXAMPLE, str(checkpoints / "token"), None, False)
    files = [first[0], first[3]]
    stamps = [os.stat(f).st_mtime_ns for f in files]
    again = app.analyse(EXAMPLE, str(checkpoints / "token"), None, False)
    assert [again[0], again[3]] == files and [os.stat(f).st_mtime_ns for f in files] == stamps


def test_app_dense_checkpoint_shows_its_top5(served, checkpoints):
    _, client = served
    seen, top5, layer, overlay, layers, load_plot, router_plot, legend, status = _predict(client, EXAMPLE,
                                                                                         checkpoints / "dense")
    assert len(top5["confidences"]) == 5 and Path(seen).is_file() and "dense (no MoE layers)" in status
    assert overlay is None and layer["choices"] == [] and not _panels(layers)


def test_app_warns_about_an_image_without_visible_content(served, checkpoints, tmp_path):
    _, client = served
    out = _predict(client, _write(tmp_path, "clear.png", Image.new("RGBA", (40, 40), (0, 0, 0, 0))),
                   checkpoints / "token")
    assert "fully transparent" in out[-1] and len(out[1]["confidences"]) == 5


def _assert_refused(out, message, caplog, capfd):
    """A user error: the message in the status line, every other output left as it was, one log line, no
    traceback."""
    *rest, status = out
    assert re.search(message, status) and "\n" not in status.strip() and "weights_only" not in status
    assert all(_skipped(o) for o in rest)
    logged = [r.getMessage() for r in caplog.records if r.name == "workbench.app"]
    assert logged and re.search(message, logged[-1]) and "\n" not in logged[-1]
    captured = capfd.readouterr()
    assert "Traceback" not in captured.out + captured.err + caplog.text


@pytest.mark.parametrize("content, message", [
    (b"", "empty"), (b"not an image at all", "not an image"), (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "corrupt"),
])
def test_app_bad_files_get_clear_messages_and_app_keeps_serving(served, checkpoints, tmp_path, content, message,
                                                                caplog, capfd):
    _, client = served
    bad = tmp_path / "upload.png"
    bad.write_bytes(content)
    with caplog.at_level(logging.INFO, logger="workbench.app"):
        _assert_refused(_predict(client, bad, checkpoints / "token"), f"Cannot use this image: .*{message}", caplog,
                        capfd)
    assert len(_predict(client, EXAMPLE, checkpoints / "token")[1]["confidences"]) == 5


@pytest.mark.parametrize("ckpt, message", [
    ("broken", "Cannot load the checkpoint"), ("/nonexistent/model", "does not exist"),
    ("notes.txt", "notes.txt is not a workbench checkpoint"),
])
def test_app_bad_checkpoint_message(served, checkpoints, ckpt, message, caplog, capfd):
    """A checkpoint that does not load: one line, and the results of the model before it are cleared (they would
    read as this checkpoint's)."""
    _, client = served
    assert len(_predict(client, EXAMPLE, checkpoints / "token")[1]["confidences"]) == 5
    with caplog.at_level(logging.INFO, logger="workbench.app"):
        out = _predict(client, EXAMPLE, checkpoints / ckpt)
    *rest, status = out
    assert re.search(message, status) and "\n" not in status.strip()
    seen, top5, _, overlay, layers, *_ = rest
    assert seen is None and overlay is None and layers == "" and not _skipped(top5) and \
        not (isinstance(top5, dict) and top5.get("confidences"))
    logged = [r.getMessage() for r in caplog.records if r.name == "workbench.app"]
    assert logged and re.search(message, logged[-1]) and "Traceback" not in "".join(capfd.readouterr())


def test_a_cleared_page_keeps_no_hover_readout(checkpoints):
    """After a checkpoint that does not load (state cleared), the readout under the overlay holds no patch data."""
    import gradio as gr

    import app

    title, readout = app.after_analysis(None, "5", None)
    assert title == gr.skip() and "data-" not in readout and readout == app._readout_html(None, None, None)


def test_clearing_the_upload_is_quiet_and_running_without_an_image_says_why(checkpoints):
    import gradio as gr

    import app

    cleared = app.on_upload(None, str(checkpoints / "token"), "5", False, "gate")
    assert len(cleared) == len(app.OUTPUTS) and all(o == gr.skip() for o in cleared)
    with pytest.warns(UserWarning, match="Upload an image"):
        out = app.analyse(None, str(checkpoints / "token"), "5", False)
    assert "Upload an image or pick an example first." in out[app.OUTPUTS.index("status")]
    assert all(o == gr.skip() for name, o in zip(app.OUTPUTS, out) if name != "status")


def test_twenty_concurrent_clients_on_one_image(served, checkpoints):
    """Many users clicking the same example: identical outputs, all 20 downloads must succeed."""
    url, _ = served
    from gradio_client import Client

    start = threading.Barrier(20)

    def one(_):
        client = Client(url, verbose=False)
        start.wait(timeout=60)  # every client connected; now all ask at once
        return _predict(client, EXAMPLE, checkpoints / "token")

    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(one, range(20)))
    assert len(results) == 20
    assert all(len(r[1]["confidences"]) == 5 and Path(r[3]).is_file() and Path(r[0]).is_file() for r in results)


def test_browser_upload_shows_overlay(served, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if not Path("/usr/bin/chromium").is_file():
        pytest.skip("Debian's chromium (/usr/bin/chromium) is not installed (make setup installs it)")

    url, _ = served
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(url)
        page.locator("#upload input[type=file]").set_input_files(EXAMPLE)
        page.locator("#overlay img").first.wait_for(state="visible", timeout=60_000)
        page.locator("#status").get_by_text("patch grid").wait_for(timeout=60_000)
        overlay = page.locator("#overlay img").first
        src = overlay.get_attribute("src")
        # no label chip or tool button drawn over the overlay (Gradio's label chip used to cover its top row)
        covering = page.evaluate("""() => { const img = document.querySelector('#overlay img');
            const r = img.getBoundingClientRect();
            return [...document.querySelectorAll('#overlay label, #overlay button')].filter(e => {
                const q = e.getBoundingClientRect();
                return !e.contains(img) && q.width > 0 && q.height > 0 && q.left < r.right && q.right > r.left
                    && q.top < r.bottom && q.bottom > r.top; }).map(e => e.tagName); }""")
        panels = page.locator("#gallery figure img")
        assert panels.count() == 2
        shapes = page.evaluate("() => [...document.querySelectorAll('#gallery figure img')].map(i => "
                               "[i.naturalWidth / i.naturalHeight, i.clientWidth / i.clientHeight])")
        captions = [page.locator("#gallery figcaption").nth(i).is_visible() for i in range(2)]
        shot = Path(os.environ.get("WORKBENCH_SCREENSHOT", tmp_path / "explorer.png"))
        page.screenshot(path=str(shot), full_page=True)
        overlay.click(position={"x": 3, "y": 3})  # the top-left patch: framed, its router distribution shown
        page.locator("#status").get_by_text("patch grid").wait_for(timeout=10_000)
        page.wait_for_function("src => document.querySelector('#overlay img').src !== src", arg=src,
                               timeout=30_000)
        page.get_by_text("Router distribution of patch (row 1 of 7, col 1 of 7)").wait_for(timeout=30_000)
        page.locator("#upload button[aria-label='Clear']").first.click()  # clearing: quiet, results stay
        page.wait_for_timeout(1500)
        errors = page.locator(".error, .toast-body.error").count()
        still = page.locator("#overlay img").first.is_visible()
        browser.close()
    assert src and ("/file=" in src or "gradio_api" in src or src.startswith("data:"))
    assert covering == []
    assert all(abs(natural - shown) < 0.02 for natural, shown in shapes)  # whole panels, not cropped
    assert all(captions) and shot.stat().st_size > 10_000
    assert errors == 0 and still


def test_a_missing_checkpoint_is_one_line_that_names_the_fix(tmp_path, capsys):
    import app

    handlers = list(app.LOG.handlers)  # main() adds a stderr handler; leave none bound to this test's capture
    try:
        with pytest.raises(SystemExit) as exit_:
            app.main(["--checkpoint", str(tmp_path / "nowhere")])
    finally:
        app.LOG.handlers[:] = handlers
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err  # usage errors exit 2
    assert "nowhere" in err and "give a model folder" in err and "default/train.sh" not in err
    assert err.count("model folder") == 1  # the fix named once


def _main_exit(argv, capsys):
    import app

    handlers = list(app.LOG.handlers)
    try:
        with pytest.raises(SystemExit) as exit_:
            app.main(argv)
    finally:
        app.LOG.handlers[:] = handlers
    return exit_.value.code, capsys.readouterr().err


@pytest.mark.parametrize("port", ["99999", "0", "-1", "http"])
def test_a_bad_port_is_one_line_naming_port(port, capsys):
    code, err = _main_exit(["--port", port], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err and "OverflowError" not in err
    assert f"'{port}' is not a port: use --port with a number from 1 to 65535" in err


def test_a_busy_port_is_one_line_naming_port(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = _main_exit(["--port", str(port)], capsys)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert f"port {port} on 127.0.0.1 is in use: pass --port with a free port" in err


def test_serving_beyond_loopback_restricts_checkpoints(checkpoints, capsys):
    import app
    from workbench.explorer import CHECKPOINTS

    assert app.parse_args([])[2] is None and app.parse_args(["--host", "::1"])[2] is None
    assert app.parse_args(["--host", "localhost"])[2] is None and app.parse_args(["--host", "127.0.0.2"])[2] is None
    for host in ("0.0.0.0", "192.168.1.5", "::", "lab-server"):
        assert app.parse_args(["--host", host])[2] == [str(CHECKPOINTS)]
    restricted = app.parse_args(["--restrict-checkpoints", "--checkpoint-dir", str(checkpoints)])[2]
    assert restricted == [str(CHECKPOINTS), str(checkpoints)]
    code, err = _main_exit(["--host", "0.0.0.0", "--checkpoint-dir", str(checkpoints / "nope")], capsys)
    assert code == 2 and "--checkpoint-dir" in err and err.count("\n") == 1


def test_restricted_app_loads_only_listed_checkpoints_and_reveals_no_path(checkpoints, tmp_path, caplog, capfd):
    """--restrict-checkpoints on loopback (as beyond it): the box is a list; anything else gets one answer, the same
    for a path that exists and one that does not."""
    import app
    from gradio_client import Client

    allowed = app.parse_args(["--restrict-checkpoints", "--checkpoint-dir", str(checkpoints)])[2]
    listed = [path for _, path in app._choices(str(checkpoints / "token"), allowed)]  # (label, path) pairs
    assert str(checkpoints / "token") in listed and str(checkpoints / "run" / "model") in listed
    assert str(checkpoints / "notes.txt") not in listed and str(app.DEFAULT_CHECKPOINT) in listed
    answers = []
    for path in (checkpoints / "notes.txt", tmp_path, tmp_path / "nope", "/etc/passwd", checkpoints / "run"):
        with pytest.warns(UserWarning, match="Cannot load the checkpoint"):
            out = app.analyse(EXAMPLE, str(path), None, False, listed=listed)
        answers.append(out[app.OUTPUTS.index("status")])
    assert len(set(answers)) == 1 and "pick one from the checkpoint box" in answers[0]
    assert "exist" not in answers[0] and "folder" not in answers[0].split(":")[0]
    port = _free_port()
    demo = app.build_app(checkpoints / "token", allowed)
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, share=False, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        assert len(_predict(client, EXAMPLE, checkpoints / "token")[1]["confidences"]) == 5
        assert len(_predict(client, EXAMPLE, checkpoints / "run" / "model")[1]["confidences"]) == 5
        refused = []
        for path in (checkpoints / "notes.txt", tmp_path / "nope"):  # the list refuses a typed value first
            with pytest.raises(Exception) as err:
                _predict(client, EXAMPLE, path)
            refused.append(str(err.value).replace(str(path), "PATH"))
        assert refused[0] == refused[1]
        assert "does not exist" not in refused[0] and "not a workbench checkpoint" not in refused[0]
    finally:
        demo.close()


def test_main_serves_with_one_line_and_no_share_hint(monkeypatch, capsys):
    import gradio as gr

    import app

    launched = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: launched.update(kw))
    handlers = list(app.LOG.handlers)
    try:
        app.main(["--port", str(_free_port()), "--host", "0.0.0.0"])
    finally:
        app.LOG.handlers[:] = handlers
    out = capsys.readouterr().out
    assert launched["share"] is False and launched["quiet"] is True  # quiet: no "set share=True" hint
    assert out.count("\n") == 1 and out.startswith("serving the routing explorer on http://0.0.0.0:")
    assert "checkpoints only from" in out


def test_browser_page_opens_with_the_first_example_routed(checkpoints, tmp_path):
    """`python app.py` opens with an example already routed (the overlay and the experts' panels, no click); the
    --no-start-example page opens empty, as build_app's default does."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if not Path("/usr/bin/chromium").is_file():
        pytest.skip("Debian's chromium (/usr/bin/chromium) is not installed (make setup installs it)")
    import app

    assert app.parse_args(["--no-start-example"])[1].no_start_example and not app.parse_args([])[1].no_start_example
    port = _free_port()
    demo = app.build_app(checkpoints / "token", start_example=True)
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, share=False, quiet=True)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#status").get_by_text("patch grid").wait_for(timeout=60_000)
            page.locator("#overlay img").first.wait_for(state="visible", timeout=30_000)
            panels = page.locator("#gallery figure img").count()
            label = page.locator("#top5").inner_text()
            browser.close()
    finally:
        demo.close()
    assert panels == 2 and "%" in label  # the experts' panels of both MoE blocks and the top classes, no click


def test_app_flags_are_spelled_out_with_the_workbench_parser(capsys):
    """app.py parses with ``workbench.cli.Parser``: an abbreviated flag is refused in one line, with the flag it is
    close to."""
    code, err = _main_exit(["--prt", "7860"], capsys)
    assert code == 2 and "unrecognized arguments: --prt 7860 (did you mean --port?) (see app.py --help)" in err
