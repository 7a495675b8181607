"""ViMoE routing explorer: which expert does each image patch go to?

    python app.py [--checkpoint DIR] [--host 127.0.0.1] [--port 7860] [--checkpoint-dir DIR ...]

Pick a checkpoint (MoE ones first) and upload an image (PNG, JPEG, WebP, GIF; any size) or click an example
thumbnail; see the model's view, its top-5 classes, the expert of every patch in every MoE layer (one colour per
expert; opacity by gate, or plain) with a hover readout of patch, expert and gate, each layer's expert load, and,
on clicking a patch, its router distribution in every layer beside the overlay (the 1/E line, the chosen expert
and its gate marked).  The model card says what the checkpoint is and, per MoE layer, whether its routing beats
random routers in the project's own specialisation test (computed once, cached beside the checkpoint); a layer
that does not is flagged beside the overlay.  A segmentation checkpoint (``vimoe_seg_*``) also shows its predicted
mask in the class palette (classes striped, experts solid) beside the experts of the selected layer, the objects in
the mask by share of pixels instead of a top-5, and, for the example scenes (which open the segmentation
checkpoint), their ground truth, pixel accuracy and mIoU.  Nothing leaves the machine: analytics are off and no
share link is made.

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
import html
import io
import json
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

from workbench.analysis.card import (NOT_SPECIALISED, ModelCards, checkpoint_choices, checkpoint_name,  # noqa: E402
                                     config_summary, weights_file)
from workbench.cli import Parser  # noqa: E402  (one line per usage error, flags spelled out)
from workbench.train.checkpoint import CheckpointError  # noqa: E402
from workbench.viz.class_palette import CLASS_COLORS, class_color, class_label  # noqa: E402
from workbench.explorer import (CHECKPOINTS, DEFAULT_CHECKPOINT, BadImage, Explorer, example_images,  # noqa: E402
                                example_scenes_paths, list_checkpoints, model_folders, one_line,
                                resolve_checkpoint)
from workbench.viz.palette import EXPERT_COLORS, SHARED_COLOR, expert_color, expert_name  # noqa: E402

LOG = logging.getLogger("workbench.app")
EXPLORER = Explorer()
CARDS = ModelCards()  # model cards: facts at once, specialisation verdicts cached or tested in the background
OVERLAY_PX = 336  # the overlay's side in pixels (at least; whole pixels per patch)
PANEL_PX = 200  # the side of each panel of "All MoE layers" and of the segmentation panels
PLOT_PX = 330  # the router and load plots' height
GATE, PLAIN = "gate", "plain"
TOP5_LABEL = "Top-5 classes"
SHARE_LABEL = "Objects in the predicted mask (share of object pixels)"
NO_IMAGE = "Upload an image or pick an example first."
_OUT = {"dir": None}
_OUT_LOCK = threading.Lock()

# one stylesheet for the page (Gradio 6 takes css only in launch(); a component's head works wherever the app is
# launched, tests included): pixel art stays crisp, the verdict notes stand out, plots and panels stack on phones
CSS = """
#overlay img, #seen img, #examples img, #scenes img { image-rendering: pixelated; }
#checkpoint input { font-size: 12px; }
#top5 * { word-break: normal; overflow-wrap: normal; }  /* class names never split mid-word */
#examples .gallery-container, #scenes .gallery-container, #examples .grid-wrap, #scenes .grid-wrap {
  height: auto !important; min-height: 0 !important; max-height: none !important; }
#examples .grid-container, #scenes .grid-container { grid-auto-rows: auto !important; gap: 4px !important;
  padding-top: 28px !important; }
#examples .grid-container { grid-template-columns: repeat(10, minmax(0, 1fr)) !important; }
#scenes .grid-container { grid-template-columns: repeat(6, minmax(0, 1fr)) !important; }
#examples .gallery-item, #scenes .gallery-item, #examples .thumbnail-item, #scenes .thumbnail-item {
  height: auto !important; aspect-ratio: 1 / 1; min-width: 0; }
#examples .caption-label, #scenes .caption-label { font-size: 9px; padding: 0 1px; max-width: 100%;
  overflow: hidden; text-overflow: clip; white-space: nowrap; }
#examples .gallery-item:nth-child(n+11) .caption-label { display: none; }  /* one name per column */
.verdict { padding: 6px 10px; border-radius: 6px; font-size: 0.92em; line-height: 1.35; color: #1f2937; }
.verdict.no { background: #fff4e5; border-left: 4px solid #d97706; }
.verdict.yes { background: #ecfdf5; border-left: 4px solid #059669; }
.verdict.pending { background: #f3f4f6; border-left: 4px solid #9ca3af; }
#readout .readout { font-size: 0.9em; min-height: 1.4em; }
#readout .chip, .legend-chip { display: inline-block; width: 12px; height: 12px; margin-right: 4px;
  vertical-align: middle; border: 1px solid #888; }
#card table { border-collapse: collapse; width: 100%; font-size: 0.9em; }
#card th, #card td { text-align: left; vertical-align: top; padding: 3px 6px; border-bottom: 1px solid #e5e7eb; }
#card th { white-space: nowrap; }
#card #card-verdicts { font-size: 0.85em; }
#card #card-verdicts th, #card #card-verdicts td { white-space: normal; padding: 3px 4px; }
#card tr.no td { background: #fff4e5; color: #1f2937; }
#card tr.yes td { background: #ecfdf5; color: #1f2937; }
#card .card-note { font-size: 0.82em; opacity: 0.85; margin-top: 4px; overflow-wrap: anywhere; }
#status p { margin: 2px 0; }
#main { align-items: flex-start; }
#top5 label.float, #seen label.float { position: static !important; }  /* their titles above, not over them */
.progress-text { display: none !important; }  /* Gradio's "processing | 2.2/0.1s": the spinner says enough */
"""
HATCH_CSS = ("repeating-linear-gradient(45deg, {c} 0 5px, rgba(0,0,0,0.45) 5px 7px), {c}")  # like render_mask's
# the hover readout over the overlay: the page knows each patch's expert and gate (data attributes of the readout,
# set with every overlay), so hovering needs no request; a click asks the server for the router distribution
HOVER_JS = """
const name = (e) => e < 0 ? 'no expert' : 'expert ' + e;
const restore = () => {
  const box = element.querySelector('.readout');
  if (!box) return;
  box.querySelector('.text').textContent = box.dataset.fixed || '';
  box.querySelector('.chip').style.background = box.dataset.fixedColor || 'transparent';
};
document.addEventListener('mousemove', (ev) => {
  const img = document.querySelector('#overlay img');
  const box = element.querySelector('.readout');
  if (!img || !box || ev.target !== img || !box.dataset.rows) return;
  const rows = +box.dataset.rows, cols = +box.dataset.cols;
  const rect = img.getBoundingClientRect();
  const nw = img.naturalWidth || rect.width, nh = img.naturalHeight || rect.height;
  const s = Math.min(rect.width / nw, rect.height / nh);
  const w = nw * s, h = nh * s;
  const x = ev.clientX - rect.left - (rect.width - w) / 2, y = ev.clientY - rect.top - (rect.height - h) / 2;
  if (x < 0 || y < 0 || x >= w || y >= h) { restore(); return; }
  const row = Math.min(rows - 1, Math.floor(y / h * rows)), col = Math.min(cols - 1, Math.floor(x / w * cols));
  const i = row * cols + col, e = +box.dataset.experts.split(',')[i], g = box.dataset.gates.split(',')[i];
  const colors = box.dataset.colors.split(',');
  const where = rows * cols === 1 ? 'the image' : `patch (row ${row + 1} of ${rows}, col ${col + 1} of ${cols})`;
  box.querySelector('.text').textContent = `Hover: ${where}, block ${box.dataset.block}: ${name(e)}` +
    (e < 0 ? '' : `, gate ${g}`) + (rows * cols === 1 ? '' : ' (click for its router distribution)');
  box.querySelector('.chip').style.background = e < 0 ? colors[colors.length - 1] : colors[e % (colors.length - 1)];
});
document.addEventListener('mouseout', (ev) => {
  const img = document.querySelector('#overlay img');
  if (img && ev.target === img) restore();
});
"""
# after a request that ended well, close the warning toasts of earlier requests (they would outlive it)
CLEAR_WARNINGS_JS = """(status) => {
  if (!/\\*\\*(Warning|Cannot|Scene on a classifier|Upload an image)/.test(status || '')) {
    document.querySelectorAll('.toast-body.warning .toast-close, .toast-body.error .toast-close')
      .forEach((b) => b.click());
  }
  return [];
}"""
# on a phone the results sit below the inputs: show them once an image is analysed
SHOW_RESULT_JS = """() => { if (window.innerWidth < 700) {
  const e = document.querySelector('#experts-col'); if (e) e.scrollIntoView({block: 'start'}); } return []; }"""
# on a phone the router plot sits below the overlay: bring it into view after a click, moving as little as possible
SHOW_ROUTER_JS = """() => { const p = document.querySelector('#router-plot');
  if (p) p.scrollIntoView({block: 'nearest'}); return []; }"""


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
    this image when there is a ground truth; class chips are striped like the class regions of the masks."""
    names = analysis.class_names
    shown = range(len(names))
    if len(names) > len(CLASS_COLORS):
        found = set(np.unique(analysis.mask))
        found |= set(np.unique(analysis.truth)) if analysis.truth is not None else set()
        shown = [c for c in shown if c in found]
    iou = (analysis.scores or {}).get("iou") or [None] * len(names)
    chips = "".join(f'<span style="display:inline-block;margin:2px 8px 2px 0"><span class="legend-chip" style="'
                    f'background:{HATCH_CSS.format(c=class_color(c)) if c else class_color(c)}"></span>'
                    f'{class_label(c, names[c])}{"" if iou[c] is None else f" (IoU {iou[c]:.2f})"}</span>'
                    for c in shown)
    return (f'<div id="class-legend" style="margin-top:6px"><b>Classes</b> (striped): {chips}</div>')


def _segmentation_html(analysis, mode: str, block: int | None) -> str:
    """Ground truth (example scenes), prediction and the experts of the selected layer, side by side at one size,
    with the class legend and, for the experts panel, the expert legend."""
    h, w = analysis.mask.shape
    scale = math.ceil(PANEL_PX / max(h, w))
    figures = [_figure(analysis.mask_picture(scale, truth=True), "ground truth")] if analysis.truth is not None else []
    figures.append(_figure(analysis.mask_picture(scale), "prediction"))
    after = _class_legend_html(analysis)
    if block is not None:
        rgb = analysis.overlay(block, scale=_scale(analysis, PANEL_PX), use_gates=mode != PLAIN)
        figures.append(_figure(rgb, f"experts, block {block}"))
        after += ('<div id="seg-expert-legend" style="margin-top:4px"><b>Experts</b> (solid): '
                  + _legend_html(analysis.num_experts, _unrouted(analysis), inline=True) + "</div>")
    return _section("Segmentation: class per pixel (striped) and expert per patch (solid)", figures, "segmentation",
                    after)


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


def _unrouted(analysis) -> bool:
    return any((e < 0).any() for e in analysis.experts.values())


def _legend_html(num_experts: int, unrouted: bool = False, inline: bool = False) -> str:
    entries = [(expert_color(e), expert_name(e)) for e in range(num_experts)]
    if unrouted:
        entries.append((SHARED_COLOR, "no expert (experts-choose left the patch out)"))
    chips = "".join(f'<span style="display:inline-block;margin:2px 8px 2px 0"><span style="display:inline-block;'
                    f'width:12px;height:12px;background:{color};margin-right:4px;vertical-align:middle">'
                    f'</span>{name}</span>' for color, name in entries)
    return chips if inline else f"<div>{chips}</div>"


def _uniform_line(fig: go.Figure, num_experts: int, x: list[str]) -> None:
    """The 1/E level as a dashed line across the bars, in the legend as "1/E" and valued in the y-axis title (an
    annotation would sit on the bars; a long legend entry would widen every legend column)."""
    if not x:
        return
    fig.add_trace(go.Scatter(x=[-0.5, len(x) - 0.5], y=[1 / num_experts] * 2, xaxis="x2", mode="lines",
                             line=dict(color="#333", dash="dash", width=1.5), hoverinfo="skip",
                             name="1/E"))
    fig.update_layout(xaxis2=dict(overlaying="x", range=[-0.5, len(x) - 0.5], visible=False))


def _bar_layout(fig: go.Figure, title: str, ytitle: str, top: float) -> None:
    fig.update_layout(barmode="group", template="plotly_white", height=PLOT_PX, bargap=0.18,
                      margin=dict(l=50, r=10, t=36, b=30), title=dict(text=title, font_size=14, x=0.01),
                      yaxis=dict(range=[0, top], title=ytitle, title_font_size=12),
                      legend=dict(orientation="h", y=-0.12, x=0, font_size=10, itemwidth=30),
                      hovermode="closest")


def _load_figure(analysis) -> go.Figure:
    loads = analysis.load()
    fig = go.Figure()
    for e in range(analysis.num_experts):
        fig.add_trace(go.Bar(x=[f"block {b}" for b in analysis.layers], y=[loads[b][e] for b in analysis.layers],
                             name=expert_name(e), marker_color=expert_color(e),
                             hovertemplate=f"{expert_name(e)}<br>%{{x}}: %{{y:.1%}} of the patches<extra></extra>"))
    top = max([float(v.max()) for v in loads.values()] + [1 / max(analysis.num_experts, 1)])
    _uniform_line(fig, analysis.num_experts, [f"block {b}" for b in analysis.layers])
    _bar_layout(fig, "Expert load of this image (first choices)",
                f"share of patches (balanced: 1/E = {1 / analysis.num_experts:.3f})", min(1.0, top * 1.2 + 0.02))
    return fig


def _router_figure(analysis, row: int, col: int) -> go.Figure:
    """Each MoE layer's router distribution for one patch (the image, under image routing): y scaled to the data,
    the uniform 1/E line, the first-choice expert outlined and labelled with its gate."""
    fig = go.Figure()
    r, c = (0, 0) if analysis.routing == "image" else (row, col)
    blocks = [f"block {b}" for b in analysis.layers]
    rows, cols = analysis.experts[analysis.layers[0]].shape[:2]
    where = "the image" if analysis.routing == "image" else f"patch (row {row + 1} of {rows}, col {col + 1} of {cols})"
    chosen = {b: int(analysis.experts[b][r, c]) for b in analysis.layers}
    top = 1 / max(analysis.num_experts, 1)
    for e in range(analysis.num_experts):
        values = [float(analysis.probs[b][r, c, e]) if e < analysis.probs[b].shape[-1] else 0.0
                  for b in analysis.layers]
        top = max([top] + values)
        mine = [chosen[b] == e for b in analysis.layers]
        text = [f"chosen<br>gate {float(analysis.gates[b][r, c]):.2f}" if m else "" for b, m in
                zip(analysis.layers, mine)]
        fig.add_trace(go.Bar(x=blocks, y=values, name=expert_name(e), marker_color=expert_color(e),
                             marker_line=dict(color="#111", width=[3 if m else 0 for m in mine]), text=text,
                             textposition="outside", textfont_size=10, cliponaxis=False, constraintext="none",
                             hovertemplate=f"{expert_name(e)}<br>%{{x}}: P = %{{y:.3f}}<extra></extra>"))
    _uniform_line(fig, analysis.num_experts, blocks)
    _bar_layout(fig, f"Router distribution of {where}", f"P(expert) (uniform: 1/E = {1 / analysis.num_experts:.3f})",
                top * 1.3)
    return fig


def _choices(current: str | None = None, allowed=None) -> list[tuple[str, str]]:
    """The checkpoint box's (label, path) list: the shipped models (restricted: and those in the ``allowed``
    folders)."""
    found = list_checkpoints() if allowed is None else [p for root in allowed for p in model_folders(root)]
    if current and current not in found:
        found.append(current)
    return checkpoint_choices(found)


def _task(path) -> str | None:
    """'classification' or 'segmentation' from a checkpoint's config.json (None where it cannot be read)."""
    try:
        return config_summary(json.loads(weights_file(path).with_name("config.json").read_text()))["task"]
    except (OSError, ValueError):
        return None


def _segmentation_checkpoint(current) -> str | None:
    """The first listed segmentation checkpoint (MoE ones first), when ``current`` is a classifier (else None; a
    path neither listed nor loaded counts as a classifier)."""
    current = str(current or DEFAULT_CHECKPOINT)
    if _known(current) and _task(current) != "classification":  # a typed path is not read here
        return None
    for _, path in _choices(None):
        if _task(path) == "segmentation":
            return path
    return None


NOT_LISTED = ("this server loads only the checkpoints it lists: pick one from the checkpoint box (its operator "
              "adds folders with --checkpoint-dir)")


def _listed(checkpoint, listed) -> bool:
    """Restricted serving: a checkpoint is loaded only when it is one the page lists (the same string), so a request
    learns nothing about any other path, whether it exists or not."""
    return listed is None or str(checkpoint) in listed


OUTPUTS = ("seen", "top5", "layer", "overlay", "layers", "load_plot", "router_plot", "legend", "status", "state",
           "picked")


CLEARED = {"seen": None, "top5": None, "layer": gr.update(choices=[], value=None), "overlay": None, "layers": "",
           "load_plot": None, "router_plot": None, "legend": "", "state": None, "picked": None}


def _refuse(message: str, clear: bool = False) -> tuple:
    """A user error: one log line on the server, a warning toast and the status line on the page.  Every earlier
    result stays as it is, unless ``clear`` (a checkpoint that does not load: the results on the page came from
    another model, and would read as this one's)."""
    LOG.warning("refused a request: %s", message)
    gr.Warning(message)
    if clear:
        return tuple(f"**{message}**" if name == "status" else CLEARED[name] for name in OUTPUTS)
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


def _classes(analysis) -> dict[str, float]:
    """What the class panel shows: a classifier's top-5; for a segmentation model the objects in the mask by their
    share of the object pixels (the background's share goes in the panel's title), or the background alone."""
    if analysis.task != "segmentation":
        return analysis.top5
    background = analysis.class_names[0]
    objects = {k: v for k, v in analysis.class_share.items() if k != background}
    total = sum(objects.values())
    return {k: v / total for k, v in objects.items()} if total > 0 else {background: 1.0}


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
        return _refuse(f"Cannot load the checkpoint: {one_line(err)}", clear=True)
    seen = (np.clip(a.seen, 0, 1) * 255).astype(np.uint8)
    seen = _png_file(np.kron(seen, np.ones((8, 8) + (() if seen.ndim == 2 else (1,)), dtype=np.uint8)))
    note = ""
    if a.warning:
        LOG.info("warned about an image: %s", a.warning)
        gr.Warning(f"Check the image: {a.warning}.")
        note = f"**Warning: {a.warning}.** "
    if a.mismatch:
        target = _segmentation_checkpoint(checkpoint)
        fix = (f"pick {checkpoint_name(target)} in the Checkpoint box (the scene thumbnails open it)" if target
               else "pick a segmentation checkpoint (vimoe_seg_*)")
        gr.Warning(f"{a.mismatch}: {fix}.")
        note += f"**Scene on a classifier: {a.mismatch}; {fix}.** "
    if a.hint:
        gr.Info(f"Hint: {a.hint}.")
        note += f"**Hint: {a.hint}.** "
    note += _segmentation_note(a)
    if not a.layers:
        shown = "its mask" if a.task == "segmentation" else "its top-5"
        status = note + f"This checkpoint is dense (no MoE layers): there is no routing to show, only {shown}."
        return (seen, _classes(a), gr.update(choices=[], value=None), None, _layers_html(a, mode), None, None, "",
                status, a, None)
    layer_choices = [(f"block {b}", str(b)) for b in a.layers]
    block = int(layer) if str(layer) in {str(b) for b in a.layers} else a.layers[-1]
    gh, gw = a.grid
    if a.routing == "image":
        picked = None
        chosen = ", ".join(f"block {b}: {expert_name(int(a.experts[b][0, 0]))}" for b in a.layers)
        status = note + f"Image-level routing: one expert per image per layer ({chosen})."
    else:
        picked = (gh // 2, gw // 2)
        status = note + (f"Token routing on a {gh}x{gw} patch grid. Hover over the overlay for a patch's expert and "
                         f"gate; click a patch for its router distribution (the framed patch). Request took "
                         f"{a.timings['total_ms']:.0f} ms.")
    return (seen, _classes(a), gr.update(choices=layer_choices, value=str(block)), _overlay(a, block, mode, picked),
            _layers_html(a, mode, block), _load_figure(a), _router_figure(a, *(picked or (0, 0))),
            _legend_html(a.num_experts, _unrouted(a)), status, a, picked)


def on_upload(image_path, checkpoint, layer, invert, mode, listed=None):
    """A new upload or example is analysed; clearing the upload keeps the page as it is, quietly."""
    if not image_path:
        return tuple(gr.skip() for _ in OUTPUTS)
    return analyse(image_path, checkpoint, layer, invert, mode, listed)


def _block(state, layer) -> int | None:
    if state is None or not state.layers:
        return None
    return int(layer) if layer is not None and str(layer) in {str(b) for b in state.layers} else state.layers[-1]


def _readout_html(state, block: int | None, picked) -> str:
    """The line under the overlay: the framed patch's expert and gate (and the image's, under image routing),
    with every patch's expert and gate as data for the hover readout."""
    if state is None or block is None:
        return '<div class="readout"><span class="chip"></span><span class="text"></span></div>'
    experts, gates = state.experts[block], state.gates[block]
    rows, cols = experts.shape
    r, c = (0, 0) if state.routing == "image" else tuple(picked or (rows // 2, cols // 2))
    e, g = int(experts[r, c]), float(gates[r, c])
    uniform = 1 / max(state.num_experts, 1)
    prob = float(state.probs[block][r, c, e]) if e >= 0 else None
    where = "The image" if state.routing == "image" else f"Framed patch (row {r + 1} of {rows}, col {c + 1} of {cols})"
    fixed = (f"{where}, block {block}: no expert" if e < 0 else
             f"{where}, block {block}: {expert_name(e)}, gate {g:.2f} (P = {prob:.3f}; uniform 1/E = {uniform:.3f})")
    color = SHARED_COLOR if e < 0 else expert_color(e)
    colors = ",".join(EXPERT_COLORS + (SHARED_COLOR,))
    data = (f'data-rows="{rows}" data-cols="{cols}" data-block="{block}" data-colors="{colors}" '
            f'data-experts="{",".join(str(int(x)) for x in experts.reshape(-1))}" '
            f'data-gates="{",".join(f"{float(x):.2f}" for x in gates.reshape(-1))}" '
            f'data-fixed="{html.escape(fixed)}" data-fixed-color="{color}"')
    return (f'<div class="readout" {data}><span class="chip" style="background:{color}"></span>'
            f'<span class="text">{html.escape(fixed)}</span></div>')


def _verdict_html(card_state, block: int | None, task: str = "classification") -> str:
    """The note beside the overlay: the selected layer's specialisation verdict from the model card."""
    if card_state is None or block is None:
        return ""
    card = card_state.card or {}
    what = "the class of its patches" if task == "segmentation" else "the image's class"
    layer = (card.get("layers") or {}).get(str(block))
    if layer is None:
        if card_state.pending:
            why, then = ("is running (once per checkpoint, a few minutes; the model card below fills in)",
                         "Until it reports")
        elif card_state.error:
            why, then = f"could not run ({html.escape(card_state.error)})", "Without it"
        else:
            return ""
        return (f'<div class="verdict pending"><b>Block {block}</b>: the specialisation test against random routers '
                f'{why}. {then}, do not read class structure into this routing.</div>')
    draws = (card.get("test") or {}).get("draws", "the")
    if layer["specialised"]:
        return (f'<div class="verdict yes"><b>Block {block}: specialised.</b> Its routing follows {what} more '
                f'than {draws} random routers of the same norm do (p = {layer["p_holm"]:.2g} after Holm).</div>')
    return (f'<div class="verdict no"><b>Block {block}: not specialised</b> (p = {layer["p_holm"]:.2g} after Holm, '
            f'against {draws} random routers of the same norm): {NOT_SPECIALISED}.</div>')


def _card_state(checkpoint, start: bool = True):
    """(model card state, task) of a checkpoint, or (None, None) when it does not load."""
    try:
        model, config, _ = EXPLORER.model(checkpoint or DEFAULT_CHECKPOINT)
    except CheckpointError:
        return None, None
    return (CARDS.state(checkpoint or DEFAULT_CHECKPOINT, model, config, start=start),
            getattr(model, "task", None) or "classification")


def show_layer(state, layer, mode, picked, checkpoint=None):
    """The overlay of the chosen layer (and, for a segmentation model, the experts panel beside its masks), its
    readout and its verdict."""
    block = _block(state, layer)
    if block is None:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip()
    panels = _layers_html(state, mode, block) if state.task == "segmentation" else gr.skip()
    card, task = _card_state(checkpoint, start=False) if checkpoint is not None else (None, None)
    verdict = _verdict_html(card, block, task) if card is not None else gr.skip()
    return _overlay(state, block, mode, picked), panels, _readout_html(state, block, picked), verdict


def change_mode(state, layer, mode, picked):
    block = _block(state, layer)
    if block is None:
        return gr.skip(), gr.skip()
    return _overlay(state, block, mode, picked), _layers_html(state, mode, block)


def label_classes(state):
    """The class panel's title: a classifier's top-5, or the objects of a segmentation model's mask by their share
    (with the background's share of the image)."""
    if state is None:
        return gr.skip()
    if state.task == "segmentation":
        background = state.class_share.get(state.class_names[0], 0.0)
        return gr.update(label=f"{SHARE_LABEL}; background {background:.0%} of the image",
                         num_top_classes=len(state.class_names) - 1)
    return gr.update(label=TOP5_LABEL, num_top_classes=5)


def after_analysis(state, layer, picked):
    """What follows every analysis: the class panel's title and the readout under the overlay (then the card)."""
    if state is None:  # nothing routed, or a checkpoint that did not load cleared the page: no stale readout
        return gr.skip(), _readout_html(None, None, None)
    return label_classes(state), _readout_html(state, _block(state, layer), picked)


def click_patch(state, layer, mode, evt: gr.SelectData):
    block = _block(state, layer)
    if block is None or evt.index is None:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip()
    x, y = evt.index
    gh, gw = state.grid
    side = _scale(state, OVERLAY_PX)
    row, col = state.patch_at(x, y, gw * side, gh * side)
    picked = (row, col) if state.routing == "token" else None
    return (_router_figure(state, row, col), _overlay(state, block, mode, picked), picked,
            _readout_html(state, block, picked))


def rerun(image_path, checkpoint, layer, invert, mode, listed=None):
    """A checkpoint or Invert changed: the image on the page is analysed again (nothing happens without one)."""
    return on_upload(image_path, checkpoint, layer, invert, mode, listed)


def _fmt_int(n) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


def _card_html(checkpoint, card_state) -> str:
    """The model card: what the checkpoint is and, per MoE layer, the specialisation verdict."""
    name = html.escape(checkpoint_name(checkpoint or DEFAULT_CHECKPOINT))
    if card_state is None or card_state.card is None:
        why = html.escape(card_state.error) if card_state is not None and card_state.error else "it does not load"
        return f'<div id="card-body"><b>Model card: {name}</b><p>No card: {why}.</p></div>'
    f = card_state.card["facts"]
    seg = f["task"] == "segmentation"
    grid = [s // p for s, p in zip(f["input"], f["patch"])] if f["input"] and f["patch"] else []
    arch = (f"{html.escape(str(f['model']))}: ViT, {f['blocks']} blocks, width {f['embed_dim']}, "
            f"{'x'.join(map(str, f['patch']))} patches on {'x'.join(map(str, f['input']))}x{f['in_chans']} input"
            f"{' (' + 'x'.join(map(str, grid)) + ' grid)' if grid else ''}, {_fmt_int(f['params'])} parameters; "
            + (f"segmentation, {f['classes']} classes" if seg else f"classifier, {f['classes']} classes"))
    rows = [("Architecture", arch)]
    if f["moe_blocks"]:
        shared = f"shared expert ({f['shared_expert']})" if f.get("shared_expert") else "no shared expert"
        rows.append(("MoE", f"blocks {', '.join(map(str, f['moe_blocks']))} of 0-{f['blocks'] - 1}: "
                            f"E = {f['num_experts']} experts, top-{f['top_k']}, {f['router']} router, "
                            f"{f['routing']} routing, {shared}"
                            + ("" if f.get("same_in_every_layer", True) else " (first MoE layer; others differ)")))
    else:
        rows.append(("MoE", "none: a dense checkpoint, no routing to explore"))
    acc = f.get("accuracy") or {}
    if acc:
        n = f" on {acc['test_n']:,} test {'scenes' if seg else 'images'}" if acc.get("test_n") else " (test)"
        text = (f"mIoU {acc['test_miou']:.1%}, pixel accuracy {acc.get('test_pixel_acc', float('nan')):.1%}{n}"
                if seg and "test_miou" in acc else
                f"{acc['test_acc']:.1%}{n}" if "test_acc" in acc else "not recorded")
        pre = (f.get("upcycled_from_dense") or {}).get("test_acc")
        if pre is not None:
            text += f"; upcycled from a dense model at {pre:.1%}"
        rows.append(("Accuracy", text))
    else:
        rows.append(("Accuracy", "not recorded in its config"))
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    out = f'<div id="card-body"><div style="font-weight:600;margin-bottom:4px">Model card: {name}</div>' \
          f'<table>{body}</table>'
    if f["moe_blocks"]:
        out += _verdicts_html(card_state, seg)
    return out + "</div>"


def _p(value) -> str:
    return "" if value is None else f"{value:.2g}"


def _verdicts_html(card_state, seg: bool) -> str:
    card = card_state.card
    title = ('<div style="font-weight:600;margin:8px 0 4px">Is the routing specialised? The project\'s test against '
             'random routers, per MoE layer</div>')
    if card.get("layers") is None:
        if card_state.pending:
            return title + ('<p id="card-verdicts" class="pending">Testing now (once per checkpoint; a few minutes '
                            'on a CPU; cached beside the checkpoint). Until it reports, do not read class structure '
                            'into the routing.</p>')
        return title + f'<p id="card-verdicts">Not tested: {html.escape(card_state.error or "unknown reason")}.</p>'
    t = card["test"]
    metric = "patch NMI" if seg else "class NMI"
    head = (f"<tr><th>block</th><th>{metric}</th><th>random NMI</th><th>p, Holm</th>"
            '<th title="the sensitivity check: trained and random routers each given equal expert loads">'
            "p, equal loads</th><th>verdict</th></tr>")
    layers = sorted(card["layers"].items(), key=lambda kv: int(kv[0]))
    rows = "".join(
        f'<tr class="{"yes" if v["specialised"] else "no"}"><td>{b}</td><td>{v["nmi"]:.3f}</td>'
        f'<td>{v["random_nmi"]:.3f}</td><td>{v["p_holm"]:.2g}</td><td>{_p(v.get("p_balanced"))}</td><td>'
        + ("specialised" if v["specialised"] else "<b>not specialised</b>") + "</td></tr>" for b, v in layers)
    flat = [b for b, v in layers if not v["specialised"]]
    many = len(flat) > 1
    warn = ("" if not flat else f'<div class="verdict no" style="margin-top:4px"><b>Block{"s" if many else ""} '
            f'{", ".join(flat)}</b>{" (each)" if many else ""}: {NOT_SPECIALISED}.</div>')
    seen = (" The equal-loads p (no Holm) is the test's sensitivity check, not its decision."
            + (" This checkpoint was trained on the whole training set, so it saw these images in training."
               if t.get("seen_in_training") else "")
            + (f" Its experts were chosen ({html.escape(str(t['pruned_by']))}) on the first {t['chosen_on']:,} of these "
               f"{'scenes' if seg else 'images'}." if t.get("chosen_on") else ""))
    what = ("each patch's majority class in the ground truth" if seg else "the image's class")
    note = (f'<div class="card-note">Test: the first {t["images"]:,} {"scenes" if seg else "images"} of the '
            f"{html.escape(t['dataset'])} {html.escape(t['split'])}; the NMI between each patch's first-choice expert "
            f"and {what}, against {t['draws']} random routers (random NMI: their mean) with the trained router's "
            "norm on the same layer "
            f"inputs; one-sided p, Holm across the {len(card['layers'])} layers, specialised when p &lt; "
            f"{t['alpha']}.{seen} Weights sha256 {card['weights_sha256'][:12]}…"
            + (f"; cached in {html.escape(card['cached_at'])}" if card.get("cached_at") else "") + ".</div>")
    return (title + f'<div style="overflow-x:auto"><table id="card-verdicts">{head}{rows}</table></div>' + warn
            + note)


def _known(checkpoint) -> bool:
    """A checkpoint whose card may be shown: a listed one, or one that an analysis has loaded (a typed path loads
    only through an analysis, with whatever checks that applies)."""
    checkpoint = str(checkpoint or DEFAULT_CHECKPOINT)
    return checkpoint in {path for _, path in _choices(None)} or EXPLORER.loaded(checkpoint)


def refresh_card(checkpoint, layer):
    """The model card and the verdict beside the overlay, from what is known now (the card's test runs in the
    background, once per checkpoint), and the timer that asks again while the test runs."""
    checkpoint = str(checkpoint or DEFAULT_CHECKPOINT)
    if not _known(checkpoint):
        name = html.escape(checkpoint_name(checkpoint))
        try:
            resolve_checkpoint(checkpoint)
        except CheckpointError as err:  # a mistyped path: say so here too, not only in the status line
            return (f'<div id="card-body"><b>No model card</b><p>{html.escape(str(err))}</p></div>', "",
                    gr.Timer(active=False))
        return (f'<div id="card-body"><b>Model card: {name}</b><p>Route an image with this checkpoint to load it; '
                f"its card follows.</p></div>", "", gr.Timer(active=False))
    card, task = _card_state(checkpoint)
    block = int(layer) if layer not in (None, "") and str(layer).isdigit() else None
    moe = (card.card or {}).get("facts", {}).get("moe_blocks") if card is not None and card.card else None
    if moe and block not in moe:
        block = moe[-1]
    pending = card is not None and card.pending
    return _card_html(checkpoint, card), _verdict_html(card, block, task), gr.Timer(active=pending)


def _example_items() -> list[tuple[str, str]]:
    """(path, class name) of the Fashion-MNIST examples (``<class>_<name>_<index>.png``), ordered so that each
    gallery column is one class: the first example of every class, then the second, ..."""
    per_class: dict[int, list[str]] = {}
    for p in example_images():
        head = os.path.basename(p).split("_")[0]
        per_class.setdefault(int(head) if head.isdigit() else 99, []).append(p)
    rows = max((len(v) for v in per_class.values()), default=0)
    ordered = [v[i] for i in range(rows) for _, v in sorted(per_class.items()) if i < len(v)]
    short = {"t-shirt-top": "T-shirt", "ankle-boot": "boot"}
    names = [os.path.basename(p).removesuffix(".png").split("_", 1)[-1].rsplit("_", 1)[0] for p in ordered]
    return [(p, short.get(n, n.replace("-", " "))) for p, n in zip(ordered, names)]


def _first_example(checkpoint, examples_list, scenes_list) -> str | None:
    """The example a page opens with: the first test image for a classifier, the first scene for a segmentation
    model (None where there is none, or the checkpoint's config cannot be read)."""
    task = _task(checkpoint)
    if task is None:
        return None
    pool = scenes_list if task == "segmentation" else [p for p, _ in examples_list]
    return pool[0] if pool else None


def build_app(checkpoint=None, allowed=None, start_example: bool = False) -> gr.Blocks:
    """The page.  ``allowed``: None serves any model folder the checkpoint box names (loopback use); a list of
    folders restricts loading to the shipped models, the models in those folders and ``checkpoint``, picked from a
    list (what serving beyond loopback needs).  ``start_example``: the page opens with the first example routed
    (a test image for a classifier, a scene for a segmentation model), so that it never opens empty."""
    checkpoint = str(checkpoint or DEFAULT_CHECKPOINT)
    choices = _choices(checkpoint, allowed)
    listed = None if allowed is None else [path for _, path in choices]

    def analyse_here(image_path, checkpoint, layer, invert, mode=GATE):
        return analyse(image_path, checkpoint, layer, invert, mode, listed)

    def on_upload_here(image_path, checkpoint, layer, invert, mode):
        return on_upload(image_path, checkpoint, layer, invert, mode, listed)

    def rerun_here(image_path, checkpoint, layer, invert, mode):
        return rerun(image_path, checkpoint, layer, invert, mode, listed)

    examples_list = _example_items()
    scenes_list = example_scenes_paths()
    start = _first_example(checkpoint, examples_list, scenes_list) if start_example else None
    with gr.Blocks(title="ViMoE routing explorer", analytics_enabled=False) as demo:
        gr.HTML("", head=f"<style>{CSS}</style>", js_on_load=None, elem_id="page-style")
        gr.Markdown("## ViMoE routing explorer\nWhich expert does each patch go to, in every MoE layer? Pick a "
                    "checkpoint and an image; hover over the overlay, click a patch.", elem_id="title")
        state = gr.State(None)
        picked = gr.State(None)
        chosen = gr.State(None)  # the scene a thumbnail picked, on its way into the upload
        with gr.Row(equal_height=False, elem_id="main"):
            with gr.Column(scale=1, min_width=300, elem_id="inputs"):
                ckpt = gr.Dropdown(choices, value=checkpoint,
                                   label="Checkpoint" + (" (or type a path)" if allowed is None else ""),
                                   allow_custom_value=allowed is None, elem_id="checkpoint")
                upload = gr.File(start, label="Image (PNG, JPEG, WebP, GIF)", type="filepath", elem_id="upload",
                                 height=110)
                with gr.Row():
                    invert = gr.Checkbox(False, label="Invert (dark object on a light background)",
                                         elem_id="invert", min_width=150)
                    run = gr.Button("Route this image", variant="primary", elem_id="run", min_width=120)
                examples = gr.Gallery([(p, c) for p, c in examples_list], columns=10, height="auto",
                                      allow_preview=False, object_fit="contain", buttons=[], interactive=False,
                                      label="Fashion-MNIST test images (one column per class)", elem_id="examples")
                scenes = gr.Gallery([(p, os.path.basename(p).removesuffix(".png")) for p in scenes_list],
                                    columns=6, height="auto", allow_preview=False, object_fit="contain", buttons=[],
                                    interactive=False, visible=bool(scenes_list), elem_id="scenes",
                                    label="Segmentation scenes (open the segmentation checkpoint; ground truth "
                                          "beside them)")
            with gr.Column(scale=1, min_width=320, elem_id="experts-col"):
                with gr.Row():
                    layer = gr.Dropdown([], label="MoE block", elem_id="layer", allow_custom_value=True,
                                        min_width=110, scale=1)
                    mode = gr.Radio([("by gate", GATE), ("plain", PLAIN)], value=GATE,
                                    label="Overlay opacity (by gate: paler = lower gate)", elem_id="mode",
                                    min_width=200, scale=2)
                verdict = gr.HTML(elem_id="verdict")
                overlay = gr.Image(show_label=False, interactive=False, buttons=[], elem_id="overlay")
                readout = gr.HTML(_readout_html(None, None, None), elem_id="readout", js_on_load=HOVER_JS)
                legend = gr.HTML(elem_id="legend")
            with gr.Column(scale=1, min_width=320, elem_id="results-col"):
                router_plot = gr.Plot(show_label=False, elem_id="router-plot")
                with gr.Row():
                    seen = gr.Image(label="As the model sees it", interactive=False, elem_id="seen", buttons=[],
                                    min_width=140, height=200)
                    top5 = gr.Label(num_top_classes=5, label=TOP5_LABEL, elem_id="top5", min_width=160)
        status = gr.Markdown(elem_id="status")
        layers = gr.HTML(elem_id="gallery")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=320):
                card = gr.HTML(elem_id="card")
            with gr.Column(scale=1, min_width=320):
                load_plot = gr.Plot(show_label=False, elem_id="load-plot")
        outputs = [seen, top5, layer, overlay, layers, load_plot, router_plot, legend, status, state, picked]
        card_timer = gr.Timer(3.0, active=False)  # ticks while a card's test runs
        quick = dict(api_name=False, show_progress="hidden")
        busy = dict(show_progress="full", show_progress_on=[overlay])
        card_io = ([ckpt, layer], [card, verdict, card_timer])

        def then_show(event, *js):
            """After an analysis: the class title and readout, stale warnings closed, the card and verdict."""
            event = event.then(after_analysis, [state, layer, picked], [top5, readout], **quick).then(
                None, [status], None, js=CLEAR_WARNINGS_JS, **quick)
            for code in js:
                event = event.then(None, None, None, js=code, **quick)
            event.then(refresh_card, *card_io, **quick)

        then_show(run.click(analyse_here, [upload, ckpt, layer, invert, mode], outputs, api_name="analyse", **busy))
        then_show(upload.change(on_upload_here, [upload, ckpt, layer, invert, mode], outputs, api_name=False, **busy),
                  SHOW_RESULT_JS)
        for control in (ckpt, invert):  # a new checkpoint or Invert: the same image again
            then_show(control.input(rerun_here, [upload, ckpt, layer, invert, mode], outputs, api_name=False, **busy))
        ckpt.change(refresh_card, *card_io, **quick)
        demo.load(refresh_card, *card_io, **quick)
        if start:  # the first example, routed as the page loads (no scrolling: the page opens at its top)
            then_show(demo.load(analyse_here, [upload, ckpt, layer, invert, mode], outputs, api_name=False, **busy))
        card_timer.tick(refresh_card, *card_io, **quick)

        def pick_example(evt: gr.SelectData):  # the other gallery's highlight goes: one image is on the page
            return examples_list[evt.index][0], gr.Gallery(selected_index=None)

        def pick_scene(current, evt: gr.SelectData):
            target = _segmentation_checkpoint(current)
            if target:
                gr.Info(f"Opened {checkpoint_name(target)} for the scene: a classifier cannot segment it.")
            return None, scenes_list[evt.index], target or gr.skip(), gr.Gallery(selected_index=None)

        # the analysis follows the upload's change; a scene empties the upload first, so that the scene already
        # shown is analysed again when picking it opened the segmentation checkpoint
        examples.select(pick_example, None, [upload, scenes], **quick)
        scenes.select(pick_scene, [ckpt], [upload, chosen, ckpt, examples], **quick).then(lambda p: p, chosen,
                                                                                           upload, **quick)
        layer.input(show_layer, [state, layer, mode, picked, ckpt], [overlay, layers, readout, verdict], **quick)
        mode.input(change_mode, [state, layer, mode, picked], [overlay, layers], **quick)
        overlay.select(click_patch, [state, layer, mode], [router_plot, overlay, picked, readout], **quick).then(
            None, None, None, js=SHOW_ROUTER_JS, **quick)
    demo.queue(default_concurrency_limit=4)
    return demo


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
    parser = Parser(prog="app.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="model folder or checkpoint file")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to serve on (default 127.0.0.1, this machine only); any other than a loopback "
                             "address restricts checkpoints to the shipped ones and --checkpoint-dir folders")
    parser.add_argument("--port", type=_port, default=7860, help="port to serve on, 1-65535 (default 7860)")
    parser.add_argument("--no-start-example", action="store_true",
                        help="open the page empty (default: with the first example image routed)")
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
        hint = "" if chosen else " (train the default with experiments/default/train.sh, or pass --checkpoint)"
        parser.exit(2, f"app.py: error: {one_line(err)}{hint}\n")
    demo = build_app(args.checkpoint, allowed, start_example=not args.no_start_example)
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
