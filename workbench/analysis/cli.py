"""``python -m workbench profile``: parameters and activated MACs of a model or checkpoint, per block.

Imports: ``workbench.models.args`` at import time; ``.flops`` inside the command.
"""
from __future__ import annotations

from ..models.args import add_moe_args, model_from_args


def register_cli(sub) -> None:
    p = sub.add_parser("profile", help="parameters and activated MACs (per image), dense-equivalent, per block")
    p.add_argument("--model", default="vimoe_tiny_patch4_28")
    p.add_argument("--checkpoint", help="profile a checkpoint's model instead of --model")
    p.add_argument("--json", action="store_true")
    add_moe_args(p)
    p.set_defaults(func=_cmd_profile)


def _cmd_profile(args) -> int:
    import json

    from .flops import profile

    model, name = model_from_args(args)
    prof = profile(model)
    if args.json:
        print(json.dumps({"model": name, **prof.summary(), "blocks": prof.blocks.to_dict("records")}, indent=2))
        return 0
    s = prof.summary()
    print(f"{name}  (MACs per image, input {tuple(s['input_size'])}; FLOPs = 2 x MACs)")
    print(f"  params        {s['params']:>14,}   dense-equivalent {s['dense_params']:>14,}   x{s['params_x']}")
    print(f"  active/token  {s['active_params']:>14,}")
    print(f"  GMACs         {s['gmacs']:>14.4f}   dense-equivalent {s['dense_gmacs']:>14.4f}   x{s['macs_x']}")
    table = prof.blocks[["block", "kind", "params", "active_params", "attn_macs", "ffn_macs", "router_macs",
                         "shared_macs", "macs"]].copy()
    for col in ("attn_macs", "ffn_macs", "router_macs", "shared_macs", "macs"):
        table[col] = (table[col] / 1e6).round(3)
    print(table.rename(columns=lambda c: c.replace("_macs", " MMACs")).to_string(index=False))
    return 0
