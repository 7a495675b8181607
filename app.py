"""ViMoE routing explorer: which expert does each image patch go to?

    python app.py [--checkpoint DIR] [--host 127.0.0.1] [--port 7860]

Upload an image (PNG, JPEG, WebP, GIF; any size) or pick a Fashion-MNIST example; see the model's view, its top-5
classes, the expert of every patch in every MoE layer (one colour per expert, opacity by gate), each layer's expert
load, and, on clicking a patch, its router distribution in every layer.  Nothing leaves the machine: analytics are
off and no share link is made.
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import plotly.graph_objects as go  # noqa: E402

from workbench.checkpoint import CheckpointError  # noqa: E402
from workbench.explorer import DEFAULT_CHECKPOINT, BadImage, Explorer, example_images, list_checkpoints  # noqa: E402
from workbench.palette import expert_color, expert_name  # noqa: E402

EXPLORER = Explorer()
OVERLAY_PX = 32  # pixels per patch in the overlays


def _legend_html(num_experts: int) -> str:
    chips = "".join(f'<span style="display:inline-block;margin:2px 8px 2px 0"><span style="display:inline-block;'
                    f'width:12px;height:12px;background:{expert_color(e)};margin-right:4px;vertical-align:middle">'
                    f'</span>{expert_name(e)}</span>' for e in range(num_experts))
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


def _choices(current: str | None = None) -> list[str]:
    found = list_checkpoints()
    if current and current not in found:
        found.append(current)
    return found


def analyse(image_path, checkpoint, layer, invert):
    """The main request: everything the page shows for one image."""
    if not image_path:
        raise gr.Error("Upload an image or pick an example first.")
    try:
        a = EXPLORER.analyse(image_path, checkpoint or DEFAULT_CHECKPOINT, bool(invert))
    except BadImage as err:
        raise gr.Error(f"Cannot use this image: {err}") from None
    except CheckpointError as err:
        raise gr.Error(f"Cannot load the checkpoint: {err}") from None
    if not a.layers:
        raise gr.Error("This checkpoint has no MoE layers, so there is no routing to show.")
    layer_choices = [str(b) for b in a.layers]
    block = int(layer) if layer in layer_choices else a.layers[-1]
    seen = (np.clip(a.seen, 0, 1) * 255).astype(np.uint8)
    seen = np.kron(seen, np.ones((8, 8) + (() if seen.ndim == 2 else (1,)), dtype=np.uint8))
    gallery = [(a.overlay(b, scale=OVERLAY_PX // 2), f"block {b}") for b in a.layers]
    mid = next(iter(a.experts.values())).shape
    if a.routing == "image":
        chosen = ", ".join(f"block {b}: {expert_name(int(a.experts[b][0, 0]))}" for b in a.layers)
        status = f"Image-level routing: one expert per image per layer ({chosen})."
    else:
        status = (f"Token routing on a {mid[0]}x{mid[1]} patch grid. Click a patch in the overlay to see its router "
                  f"distribution. Request took {a.timings['total_ms']:.0f} ms.")
    return (seen, a.top5, gr.update(choices=layer_choices, value=str(block)), a.overlay(block, scale=OVERLAY_PX),
            gallery, _load_figure(a), _router_figure(a, mid[0] // 2, mid[1] // 2), _legend_html(a.num_experts),
            status, a)


def show_layer(state, layer):
    if state is None or layer is None:
        return gr.update()
    return state.overlay(int(layer), scale=OVERLAY_PX)


def click_patch(state, evt: gr.SelectData):
    if state is None:
        return gr.update()
    x, y = evt.index
    gh, gw = next(iter(state.experts.values())).shape
    row, col = state.patch_at(x, y, gw * OVERLAY_PX, gh * OVERLAY_PX)
    return _router_figure(state, row, col)


def build_app(checkpoint=None) -> gr.Blocks:
    checkpoint = str(checkpoint or DEFAULT_CHECKPOINT)
    with gr.Blocks(title="ViMoE routing explorer", analytics_enabled=False) as demo:
        gr.Markdown("# ViMoE routing explorer\nWhich expert does each patch go to, in every MoE layer?")
        state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Image (PNG, JPEG, WebP, GIF)", type="filepath", elem_id="upload")
                ckpt = gr.Dropdown(_choices(checkpoint), value=checkpoint, label="Checkpoint (or type a path)",
                                   allow_custom_value=True, elem_id="checkpoint")
                invert = gr.Checkbox(False, label="Invert (dark object on a light background)")
                run = gr.Button("Route this image", variant="primary", elem_id="run")
                gr.Examples(example_images(), inputs=[upload], label="Fashion-MNIST test images")
            with gr.Column(scale=1):
                seen = gr.Image(label="As the model sees it", interactive=False, elem_id="seen")
                top5 = gr.Label(num_top_classes=5, label="Top-5 classes")
            with gr.Column(scale=1):
                layer = gr.Dropdown([], label="MoE layer", elem_id="layer")
                overlay = gr.Image(label="Expert per patch (opacity: gate); click a patch", interactive=False,
                                   elem_id="overlay")
                legend = gr.HTML()
        status = gr.Markdown(elem_id="status")
        gallery = gr.Gallery(label="All MoE layers", columns=6, height=260, object_fit="contain", elem_id="gallery")
        with gr.Row():
            load_plot = gr.Plot(label="Expert load")
            router_plot = gr.Plot(label="Router distribution")
        outputs = [seen, top5, layer, overlay, gallery, load_plot, router_plot, legend, status, state]
        run.click(analyse, [upload, ckpt, layer, invert], outputs, api_name="analyse")
        upload.change(analyse, [upload, ckpt, layer, invert], outputs, api_name=False)
        layer.input(show_layer, [state, layer], overlay, api_name=False)
        overlay.select(click_patch, [state], router_plot, api_name=False)
    demo.queue(default_concurrency_limit=4)
    return demo


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="model folder or checkpoint file")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    try:
        EXPLORER.model(args.checkpoint)  # fail fast, with the reason, before serving
    except CheckpointError as err:
        parser.exit(1, f"app.py: error: {err}\n(train the default with experiments/default/train.sh, or pass "
                       "--checkpoint)\n")
    build_app(args.checkpoint).launch(server_name=args.host, server_port=args.port, share=False,
                                      show_error=True)


if __name__ == "__main__":
    main()
