"""ViMoE routing explorer: which expert does each image patch go to?

    python app.py [--checkpoint DIR] [--host 127.0.0.1] [--port 7860] [--checkpoint-dir DIR ...]

Upload an image (PNG, JPEG, WebP, GIF; any size) or pick a Fashion-MNIST example; see the model's view, its top-5
classes, the expert of every patch in every MoE layer (one colour per expert; opacity by gate, or plain), each
layer's expert load, and, on clicking a patch, its router distribution in every layer.  A segmentation checkpoint
(``vimoe_seg_*``) also shows its predicted mask in the class palette beside the experts of the selected layer, the
classes in the mask by share of pixels instead of a top-5, and, for the example scenes, their ground truth, pixel
accuracy and mIoU.  Nothing leaves the machine: analytics are off and no share link is made.

Served beyond loopback (``--host`` other than 127.0.0.1 / ::1 / localhost) the checkpoint box is a list: the shipped
models, ``--checkpoint`` and the model folders in each ``--checkpoint-dir``; nothing else is loaded, and a request
for anything else gets the same answer whether that path exists or not.  ``--restrict-checkpoints`` does the same on
loopback.
"""
from __future__ import annotations

import argparse
import atexit
import base64
import errno
import hashlib
import io
import logging
import math
import os
import shutil
import socket
import tempfile
import threading
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import plotly.graph_objects as go  # noqa: E402
from PIL import Image  # noqa: E402

from workbench.train.checkpoint import CheckpointError  # noqa: E402
from workbench.viz.class_palette import CLASS_COLORS, class_color, class_label  # noqa: E402
from workbench.explorer import (CHECKPOINTS, DEFAULT_CHECKPOINT, BadImage, Explorer,  # noqa: E402
                                example_images, example_scenes_paths, list_checkpoints, model_folders, one_line)
from workbench.viz.palette import SHARED_COLOR, expert_color, expert_name  # noqa: E402

LOG = logging.getLogger("workbench.app")
EXPLORER = Explorer()
OVERLAY_PX = 336  # the overlay's side in pixels (at least; whole pixels per patch)
PANEL_PX = 200  # the side of each panel of "All MoE layers" and of the segmentation panels
GATE, PLAIN = "gate", "plain"
TOP5_LABEL = "Top-5 classes"
SHARE_LABEL = "Classes in the predicted mask (share of pixels)"
NO_IMAGE = "Upload an image or pick an example first."
_OUT = {"dir": None}
_OUT_LOCK = threading.Lock()


def _output_dir() -> str:
    with _OUT_LOCK:
        if _OUT["dir"] is None:
            _OUT["dir"] = tempfile.mkdtemp(prefix="vimoe-explorer-")
            atexit.register(shutil.rmtree, _OUT["dir"], True)
        return _OUT["dir"]


def _png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _png_file(rgb: np.ndarray) -> str:
    """An image as a PNG file named by its content, written once and atomically; its path.

    Gradio encodes returned arrays into a content-named file of its cache and rewrites that file on every request,
    so when concurrent requests have identical outputs (many users on one example) one request's download reads the
    file while another rewrites it and fails ("peer closed connection").  A returned file is copied into the cache
    only when no copy with its content is there yet, atomically, so identical outputs share one finished file."""
    data = _png_bytes(rgb)
    path = os.path.join(_output_dir(), hashlib.sha256(data).hexdigest()[:40] + ".png")
    if not os.path.exists(path):
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".part")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    return path


def _scale(analysis, side: int) -> int:
    """Pixels per patch so that the picture is at least ``side`` pixels and holds every image pixel whole."""
    (gh, gw), (h, w) = analysis.grid, analysis.seen.shape[:2]
    return max(math.ceil(side / max(gh, gw)), math.ceil(h / gh), math.ceil(w / gw))


def _overlay(analysis, block: int, mode: str, picked) -> str:
    picked = tuple(picked) if picked is not None and analysis.routing == "token" else None
    return _png_file(analysis.overlay(block, scale=_scale(analysis, OVERLAY_PX), use_gates=mode != PLAIN,
                                      picked=picked))


def _figure(rgb: np.ndarray, caption: str) -> str:
    """One panel: an inline PNG (no file to share), shown whole and scaled without blur, with its caption."""
    src = "data:image/png;base64," + base64.b64encode(_png_bytes(rgb)).decode()
    return (f'<figure style="margin:0"><img src="{src}" alt="{caption}" style="width:100%;height:auto;'
            f'image-rendering:pixelated;display:block"><figcaption style="text-align:center;'
            f'font-size:0.9em;padding-top:2px">{caption}</figcaption></figure>')


def _section(title: str, figures: list[str], elem_id: str | None = None, after: str = "") -> str:
    """A titled grid of panels (then ``after``), each panel at most ``PANEL_PX`` wide."""
    attrs = f' id="{elem_id}" style="margin-bottom:12px"' if elem_id else ""
    return (f'<div{attrs}><div style="font-weight:600;margin-bottom:4px">{title}</div><div style="display:grid;'
            f'grid-template-columns:repeat(auto-fill,minmax(140px,{PANEL_PX}px));gap:10px">' + "".join(figures)
            + "</div>" + after + "</div>")


def _class_legend_html(analysis) -> str:
    """The class palette's legend: every class (only those in either mask once colours repeat), with its IoU on
    this image when there is a ground truth."""
    names = analysis.class_names
    shown = range(len(names))
    if len(names) > len(CLASS_COLORS):
        found = set(np.unique(analysis.mask))
        found |= set(np.unique(analysis.truth)) if analysis.truth is not None else set()
        shown = [c for c in shown if c in found]
    iou = (analysis.scores or {}).get("iou") or [None] * len(names)
    chips = "".join(f'<span style="display:inline-block;margin:2px 8px 2px 0"><span style="display:inline-block;'
                    f'width:12px;height:12px;background:{class_color(c)};border:1px solid #888;margin-right:4px;'
                    f'vertical-align:middle"></span>{class_label(c, names[c])}'
                    f'{"" if iou[c] is None else f" (IoU {iou[c]:.2f})"}</span>' for c in shown)
    return f'<div id="class-legend" style="margin-top:6px">{chips}</div>'


def _segmentation_html(analysis, mode: str, block: int | None) -> str:
    """Ground truth (example scenes), prediction and the experts of the selected layer, side by side at one size,
    with the class legend."""
    h, w = analysis.mask.shape
    scale = math.ceil(PANEL_PX / max(h, w))
    figures = [_figure(analysis.mask_picture(scale, truth=True), "ground truth")] if analysis.truth is not None else []
    figures.append(_figure(analysis.mask_picture(scale), "prediction"))
    if block is not None:
        rgb = analysis.overlay(block, scale=_scale(analysis, PANEL_PX), use_gates=mode != PLAIN)
        figures.append(_figure(rgb, f"experts, block {block}"))
    return _section("Segmentation: class per pixel (colours below) and expert per patch", figures, "segmentation",
                    _class_legend_html(analysis))


def _layers_html(analysis, mode: str, block: int | None = None) -> str:
    """Every MoE layer's overlay, whole, with its caption; for a segmentation model, the masks and the experts of
    ``block`` (default: the last MoE layer) first."""
    if block is None and analysis.layers:
        block = analysis.layers[-1]
    seg = _segmentation_html(analysis, mode, block) if analysis.task == "segmentation" else ""
    if not analysis.layers:
        return seg
    figures = [_figure(analysis.overlay(b, scale=_scale(analysis, PANEL_PX), use_gates=mode != PLAIN), f"block {b}")
               for b in analysis.layers]
    return seg + _section("All MoE layers", figures)


def _legend_html(num_experts: int, unrouted: bool = False) -> str:
    entries = [(expert_color(e), expert_name(e)) for e in range(num_experts)]
    if unrouted:
        entries.append((SHARED_COLOR, "no expert (experts-choose left the patch out)"))
    chips = "".join(f'<span style="display:inline-block;margin:2px 8px 2px 0"><span style="display:inline-block;'
                    f'width:12px;height:12px;background:{color};margin-right:4px;vertical-align:middle">'
                    f'</span>{name}</span>' for color, name in entries)
    return f"<div>{chips}</div>"


def _load_figure(analysis) -> go.Figure:
    loads = analysis.load()
    fig = go.Figure()
    for e in range(analysis.num_experts):
        fig.add_trace(go.Bar(x=[f"block {b}" for b in analysis.layers], y=[loads[b][e] for b in analysis.layers],
                             name=expert_name(e), marker_color=expert_color(e)))
    fig.update_layout(barmode="stack", template="plotly_white", height=300, margin=dict(l=40, r=10, t=40, b=30),
                      title="Expert load of this image (share of patches, first choice)", yaxis=dict(range=[0, 1]))
    return fig


def _router_figure(analysis, row: int, col: int) -> go.Figure:
    fig = go.Figure()
    where = "the image" if analysis.routing == "image" else f"patch (row {row}, col {col})"
    for e in range(analysis.num_experts):
        values = []
        for b in analysis.layers:
            probs = analysis.probs[b]
            r, c = (0, 0) if analysis.routing == "image" else (row, col)
            values.append(float(probs[r, c, e]) if e < probs.shape[-1] else 0.0)
        fig.add_trace(go.Bar(x=[f"block {b}" for b in analysis.layers], y=values, name=expert_name(e),
                             marker_color=expert_color(e)))
    fig.update_layout(barmode="group", template="plotly_white", height=300, margin=dict(l=40, r=10, t=40, b=30),
                      title=f"Router distribution of {where}", yaxis=dict(range=[0, 1], title="P(expert)"))
    return fig


def _choices(current: str | None = None, allowed=None) -> list[str]:
    """The checkpoint box's list: the shipped models (restricted: and those in the ``allowed`` folders)."""
    found = list_checkpoints() if allowed is None else [p for root in allowed for p in model_folders(root)]
    if current and current not in found:
        found.append(current)
    return found


NOT_LISTED = ("this server loads only the checkpoints it lists: pick one from the checkpoint box (its operator "
              "adds folders with --checkpoint-dir)")


def _listed(checkpoint, listed) -> bool:
    """Restricted serving: a checkpoint is loaded only when it is one the page lists (the same string), so a request
    learns nothing about any other path, whether it exists or not."""
    return listed is None or str(checkpoint) in listed


OUTPUTS = ("seen", "top5", "layer", "overlay", "layers", "load_plot", "router_plot", "legend", "status", "state",
           "picked")


def _refuse(message: str) -> tuple:
    """A user error: one log line on the server, a warning toast and the status line on the page; every earlier
    result stays as it is."""
    LOG.warning("refused a request: %s", message)
    gr.Warning(message)
    return tuple(f"**{message}**" if name == "status" else gr.skip() for name in OUTPUTS)


def _segmentation_note(analysis) -> str:
    """The status line's part for a segmentation model: what it predicts, and an example scene's scores."""
    if analysis.task != "segmentation":
        return ""
    text = f"Segmentation model ({len(analysis.class_names)} classes): a class for every pixel. "
    if analysis.scores is None:
        return text + "No ground truth for this image (the example scenes have one). "
    return text + (f"Against this scene's ground truth: pixel accuracy {analysis.scores['pixel_acc']:.1%}, "
                   f"mIoU {analysis.scores['miou']:.1%}. ")


def analyse(image_path, checkpoint, layer, invert, mode=GATE, listed=None):
    """The main request: everything the page shows for one image.  ``listed``: restricted serving, the checkpoints
    (and the only ones) that may be loaded."""
    if not image_path:
        return _refuse(NO_IMAGE)
    if not _listed(checkpoint or DEFAULT_CHECKPOINT, listed):
        return _refuse(f"Cannot load the checkpoint: {NOT_LISTED}")
    try:
        a = EXPLORER.analyse(image_path, checkpoint or DEFAULT_CHECKPOINT, bool(invert))
    except BadImage as err:
        return _refuse(f"Cannot use this image: {err}")
    except CheckpointError as err:
        return _refuse(f"Cannot load the checkpoint: {one_line(err)}")
    seen = (np.clip(a.seen, 0, 1) * 255).astype(np.uint8)
    seen = _png_file(np.kron(seen, np.ones((8, 8) + (() if seen.ndim == 2 else (1,)), dtype=np.uint8)))
    note = ""
    if a.warning:
        LOG.info("warned about an image: %s", a.warning)
        gr.Warning(f"Check the image: {a.warning}.")
        note = f"**Warning: {a.warning}.** "
    note += _segmentation_note(a)
    if not a.layers:
        shown = "its mask" if a.task == "segmentation" else "its top-5"
        status = note + f"This checkpoint is dense (no MoE layers): there is no routing to show, only {shown}."
        return (seen, a.top5, gr.update(choices=[], value=None), None, _layers_html(a, mode), None, None, "", status,
                a, None)
    layer_choices = [str(b) for b in a.layers]
    block = int(layer) if layer in layer_choices else a.layers[-1]
    gh, gw = a.grid
    if a.routing == "image":
        picked = None
        chosen = ", ".join(f"block {b}: {expert_name(int(a.experts[b][0, 0]))}" for b in a.layers)
        status = note + f"Image-level routing: one expert per image per layer ({chosen})."
    else:
        picked = (gh // 2, gw // 2)
        status = note + (f"Token routing on a {gh}x{gw} patch grid. Click a patch in the overlay to see its router "
                         f"distribution (the framed patch). Request took {a.timings['total_ms']:.0f} ms.")
    return (seen, a.top5, gr.update(choices=layer_choices, value=str(block)), _overlay(a, block, mode, picked),
            _layers_html(a, mode, block), _load_figure(a), _router_figure(a, *(picked or (0, 0))),
            _legend_html(a.num_experts, any((e < 0).any() for e in a.experts.values())), status, a, picked)


def on_upload(image_path, checkpoint, layer, invert, mode, listed=None):
    """A new upload or example is analysed; clearing the upload keeps the page as it is, quietly."""
    if not image_path:
        return tuple(gr.skip() for _ in OUTPUTS)
    return analyse(image_path, checkpoint, layer, invert, mode, listed)


def _block(state, layer) -> int | None:
    if state is None or not state.layers:
        return None
    return int(layer) if layer is not None and str(layer) in {str(b) for b in state.layers} else state.layers[-1]


def show_layer(state, layer, mode, picked):
    """The overlay of the chosen layer (and, for a segmentation model, the experts panel beside its masks)."""
    block = _block(state, layer)
    if block is None:
        return gr.skip(), gr.skip()
    panels = _layers_html(state, mode, block) if state.task == "segmentation" else gr.skip()
    return _overlay(state, block, mode, picked), panels


def change_mode(state, layer, mode, picked):
    block = _block(state, layer)
    if block is None:
        return gr.skip(), gr.skip()
    return _overlay(state, block, mode, picked), _layers_html(state, mode, block)


def label_classes(state):
    """The class panel's title: a classifier's top-5, or every class of a segmentation model's mask by its share."""
    if state is None:
        return gr.skip()
    if state.task == "segmentation":
        return gr.update(label=SHARE_LABEL, num_top_classes=len(state.class_names))
    return gr.update(label=TOP5_LABEL, num_top_classes=5)


def click_patch(state, layer, mode, evt: gr.SelectData):
    block = _block(state, layer)
    if block is None or evt.index is None:
        return gr.skip(), gr.skip(), gr.skip()
    x, y = evt.index
    gh, gw = state.grid
    side = _scale(state, OVERLAY_PX)
    row, col = state.patch_at(x, y, gw * side, gh * side)
    picked = (row, col) if state.routing == "token" else None
    return _router_figure(state, row, col), _overlay(state, block, mode, picked), picked


def build_app(checkpoint=None, allowed=None) -> gr.Blocks:
    """The page.  ``allowed``: None serves any model folder the checkpoint box names (loopback use); a list of
    folders restricts loading to the shipped models, the models in those folders and ``checkpoint``, picked from a
    list (what serving beyond loopback needs)."""
    checkpoint = str(checkpoint or DEFAULT_CHECKPOINT)
    choices = _choices(checkpoint, allowed)
    listed = None if allowed is None else choices

    def analyse_here(image_path, checkpoint, layer, invert, mode=GATE):
        return analyse(image_path, checkpoint, layer, invert, mode, listed)

    def on_upload_here(image_path, checkpoint, layer, invert, mode):
        return on_upload(image_path, checkpoint, layer, invert, mode, listed)

    with gr.Blocks(title="ViMoE routing explorer", analytics_enabled=False) as demo:
        gr.Markdown("# ViMoE routing explorer\nWhich expert does each patch go to, in every MoE layer?")
        state = gr.State(None)
        picked = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Image (PNG, JPEG, WebP, GIF)", type="filepath", elem_id="upload")
                ckpt = gr.Dropdown(choices, value=checkpoint,
                                   label="Checkpoint" + (" (or type a path)" if allowed is None else ""),
                                   allow_custom_value=allowed is None, elem_id="checkpoint")
                invert = gr.Checkbox(False, label="Invert (dark object on a light background)")
                run = gr.Button("Route this image", variant="primary", elem_id="run")
                gr.Examples(example_images(), inputs=[upload], label="Fashion-MNIST test images")
                if example_scenes_paths():
                    gr.Examples(example_scenes_paths(), inputs=[upload], elem_id="scenes",
                                label="Segmentation scenes (ground truth beside them)")
            with gr.Column(scale=1):
                seen = gr.Image(label="As the model sees it", interactive=False, elem_id="seen")
                top5 = gr.Label(num_top_classes=5, label=TOP5_LABEL)
            with gr.Column(scale=1):
                # choices arrive with the first analysis; a client of /analyse may name a layer before that (a
                # block the checkpoint does not route shows its last MoE layer instead)
                layer = gr.Dropdown([], label="MoE layer", elem_id="layer", allow_custom_value=True)
                mode = gr.Radio([("by gate (paler: lower gate)", GATE), ("plain (opaque)", PLAIN)], value=GATE,
                                label="Overlay opacity", elem_id="mode")
                gr.Markdown("Expert per patch: click a patch to see its router distribution")
                overlay = gr.Image(show_label=False, interactive=False, buttons=[], elem_id="overlay")
                legend = gr.HTML(elem_id="legend")
        status = gr.Markdown(elem_id="status")
        layers = gr.HTML(elem_id="gallery")
        with gr.Row():
            load_plot = gr.Plot(label="Expert load")
            router_plot = gr.Plot(label="Router distribution")
        outputs = [seen, top5, layer, overlay, layers, load_plot, router_plot, legend, status, state, picked]
        run.click(analyse_here, [upload, ckpt, layer, invert, mode], outputs, api_name="analyse").then(
            label_classes, state, top5, api_name=False)
        upload.change(on_upload_here, [upload, ckpt, layer, invert, mode], outputs, api_name=False).then(
            label_classes, state, top5, api_name=False)
        layer.input(show_layer, [state, layer, mode, picked], [overlay, layers], api_name=False)
        mode.input(change_mode, [state, layer, mode, picked], [overlay, layers], api_name=False)
        overlay.select(click_patch, [state, layer, mode], [router_plot, overlay, picked], api_name=False)
    demo.queue(default_concurrency_limit=4)
    return demo


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: use --port with a number from 1 to 65535 "
                                         "(default 7860)")
    return port


def is_loopback(host: str) -> bool:
    """Whether ``host`` serves this machine only (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def parse_args(argv=None):
    """The options, and the folders checkpoints may be loaded from: None (any, on loopback) or a list (restricted:
    served beyond loopback, or --restrict-checkpoints)."""
    parser = _Parser(prog="app.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="model folder or checkpoint file")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to serve on (default 127.0.0.1, this machine only); any other than a loopback "
                             "address restricts checkpoints to the shipped ones and --checkpoint-dir folders")
    parser.add_argument("--port", type=_port, default=7860, help="port to serve on, 1-65535 (default 7860)")
    parser.add_argument("--checkpoint-dir", action="append", default=[], metavar="DIR",
                        help="when restricted: also list the model folders in DIR (and DIR/*/model of run folders); "
                             "repeat for several")
    parser.add_argument("--restrict-checkpoints", action="store_true",
                        help="load only listed checkpoints even on a loopback address (the checkpoint box becomes a "
                             "list; typed paths are refused)")
    args = parser.parse_args(argv)
    allowed = None
    if args.restrict_checkpoints or not is_loopback(args.host):
        for folder in args.checkpoint_dir:
            if not Path(folder).is_dir():
                parser.exit(2, f"app.py: error: --checkpoint-dir {folder} is not a folder: give folders holding "
                               "model folders (model.safetensors + config.json)\n")
        allowed = [str(CHECKPOINTS), *args.checkpoint_dir]
    return parser, args, allowed


def _check_port(parser, host: str, port: int) -> None:
    """A busy or forbidden port: one line naming --port, before the model is loaded."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            reason = "is in use" if err.errno == errno.EADDRINUSE else f"cannot be used ({err.strerror or err})"
            parser.exit(1, f"app.py: error: port {port} on {host} {reason}: pass --port with a free port, e.g. "
                           f"--port {port + 1 if port < 65535 else 7860}\n")


def main(argv=None) -> None:
    parser, args, allowed = parse_args(argv)
    if not LOG.handlers:  # one line per refused request or warned image; user errors print no traceback
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        LOG.addHandler(handler)
        LOG.setLevel(logging.INFO)
        LOG.propagate = False
    _check_port(parser, args.host, args.port)
    try:
        EXPLORER.model(args.checkpoint)  # fail fast, with the reason, before serving
    except CheckpointError as err:
        chosen = args.checkpoint != str(DEFAULT_CHECKPOINT)
        hint = ("pass --checkpoint a model folder (model.safetensors + config.json)" if chosen else
                "train the default with experiments/default/train.sh, or pass --checkpoint")
        parser.exit(1, f"app.py: error: {one_line(err)} ({hint})\n")
    demo = build_app(args.checkpoint, allowed)
    where = f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}"
    print(f"serving the routing explorer on {where} (Ctrl-C stops it)"
          + (f"; checkpoints only from {', '.join(allowed)}" if allowed is not None else ""), flush=True)
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=False, show_error=True, quiet=True)
    except OSError as err:  # taken between the check and the start
        parser.exit(1, f"app.py: error: cannot serve on {args.host}:{args.port} ({one_line(err)}): pass --port "
                       "with a free port\n")
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
