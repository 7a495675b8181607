"""What people look at: the one expert palette (``palette``), the segmentation classes' colours
(``class_palette``) and the plotly figures of the notebooks (``figures``; each is also a name here:
``viz.forest_plot``), with the benchmarks' in ``speed``.

Imports: plotly, pandas, numpy, scipy; nothing else of ``workbench``.
"""
from .._lazy import exports

__getattr__, __dir__, __all__ = exports(__name__, {
    "class_expert_heatmap": "figures",
    "metrics_by_layer": "figures",
    "specialisation_by_depth": "figures",
    "forest_plot": "figures",
    "pruning_subsets": "figures",
    "expert_pruning": "figures",
    "position_maps": "figures",
    "overlay_rgb": "figures",
    "patch_overlay": "figures",
    "load_over_training": "figures",
    "flops_breakdown": "figures",
    "save_figure": "figures",
    "segmentation_panels": "figures",
    "regions_by_depth": "figures",
    "accuracy_by_epoch": "figures",
    "time_split": "speed",
    "placement_interaction": "interaction", "guided_placements": "interaction",
    "render_overlay": "overlay", "render_mask": "overlay",
    "EXPERT_COLORS": "palette",
    "SHARED_COLOR": "palette",
    "NULL_COLOR": "palette",
    "expert_color": "palette",
    "expert_rgb": "palette",
    "expert_name": "palette",
    "expert_rgb_array": "palette",
    "hex_rgb": "palette",
    "paint": "palette",
    "CLASS_COLORS": "class_palette",
    "IGNORE_COLOR": "class_palette",
    "class_color": "class_palette",
    "class_label": "class_palette",
    "class_rgb_array": "class_palette"})
