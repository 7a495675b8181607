"""The routing explorer: image decoding, the Gradio app driven with gradio_client, and one browser run."""
import io
import os
import shutil
import socket
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from workbench.checkpoint import model_config, save_model
from workbench.explorer import BadImage, Explorer, example_images, read_image, to_model_input

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


def _predict(client, path, ckpt, layer=None):
    from gradio_client import handle_file

    return client.predict(handle_file(str(path)), str(ckpt), layer, False, api_name="/analyse")


def test_app_predicts_an_example(served, checkpoints):
    _, client = served
    out = _predict(client, EXAMPLE, checkpoints / "token")
    seen, top5, layer, overlay, gallery, load_plot, router_plot, legend, status = out
    assert len(top5["confidences"]) == 5 and layer["value"] == "5"
    assert Path(overlay).is_file() and Path(seen).is_file() and len(gallery) == 2
    assert "expert 3" in legend and "7x7 patch grid" in status
    image = _predict(client, EXAMPLE, checkpoints / "image")
    assert "Image-level routing" in image[-1]


@pytest.mark.parametrize("content, message", [
    (b"", "empty"), (b"not an image at all", "not an image"), (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "corrupt"),
])
def test_app_bad_files_get_clear_messages_and_app_keeps_serving(served, checkpoints, tmp_path, content, message):
    from gradio_client.exceptions import AppError

    _, client = served
    bad = tmp_path / "upload.png"
    bad.write_bytes(content)
    with pytest.raises(AppError, match=message):
        _predict(client, bad, checkpoints / "token")
    assert len(_predict(client, EXAMPLE, checkpoints / "token")[1]["confidences"]) == 5


def test_app_bad_checkpoint_message(served, checkpoints):
    from gradio_client.exceptions import AppError

    _, client = served
    with pytest.raises(AppError, match="Cannot load the checkpoint"):
        _predict(client, EXAMPLE, checkpoints / "broken")
    with pytest.raises(AppError, match="Cannot load the checkpoint"):
        _predict(client, EXAMPLE, "/nonexistent/model")


def test_twenty_concurrent_requests(served, checkpoints):
    url, _ = served
    from gradio_client import Client

    examples = example_images()

    def one(i):
        client = Client(url, verbose=False)
        return _predict(client, examples[i % len(examples)], checkpoints / "token")[1]

    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(one, range(20)))
    assert len(results) == 20 and all(len(r["confidences"]) == 5 for r in results)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (make setup does)")
def test_browser_upload_shows_overlay(served, tmp_path):
    from playwright.sync_api import sync_playwright

    url, _ = served
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(url)
        page.locator("#upload input[type=file]").set_input_files(EXAMPLE)
        page.locator("#overlay img").first.wait_for(state="visible", timeout=60_000)
        page.locator("#status").get_by_text("patch grid").wait_for(timeout=60_000)
        src = page.locator("#overlay img").first.get_attribute("src")
        shot = Path(os.environ.get("WORKBENCH_SCREENSHOT", tmp_path / "explorer.png"))
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert src and ("/file=" in src or "gradio_api" in src or src.startswith("data:"))
    assert shot.stat().st_size > 10_000
