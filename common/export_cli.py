"""`collafuse export`: a server's or client's model as a diffusers folder with a collafuse.json."""

from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """\
The folder holds unet/ (UNet2DModel.save_pretrained, safetensors) and collafuse.json (schedule
and its hash, role and timesteps, image shape, network, labels, source checkpoint with its step
and sha256). The checkpoint is verified first. Start a server or client from the folder with
init_from = "DIR" in its config. Exit codes: 0 written; 1 the checkpoint is damaged or cannot
be read; 2 bad usage (no such checkpoint, the wrong kind, --out not empty without --overwrite).
"""


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `collafuse export`."""
    p = sub.add_parser(
        "export",
        help="write a server's or a client's model as a diffusers folder (safetensors)",
        description="Write a server's or a client's model as a diffusers folder.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--server-checkpoint",
        type=Path,
        metavar="PATH",
        help="a server checkpoint (DATA_DIR/checkpoints/server.pt, or an older generation "
        "server.pt.1) or the server's DATA_DIR; its EMA weights are exported",
    )
    which.add_argument(
        "--client-state",
        type=Path,
        metavar="DIR",
        help="a client's state_dir (its model is STATE_DIR/checkpoints/client.pt) or that "
        "checkpoint file; its EMA weights are exported",
    )
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="the folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export at --out")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    """Export, then say what was written."""
    # Here, not at the top: the export module brings torch and diffusers, which parsing the
    # command line does not need.
    from collafuse.common.export import MANIFEST, UNET_DIR, export_client, export_server

    if args.server_checkpoint is not None:
        manifest = export_server(args.server_checkpoint, args.out, overwrite=args.overwrite)
    else:
        manifest = export_client(args.client_state, args.out, overwrite=args.overwrite)
    source = manifest.source
    low, high = manifest.t_range
    print(
        f"exported the {manifest.role} model (EMA weights of step {source.step} from "
        f"{source.path}, sha256 {source.sha256[:16]}) to {args.out}: {UNET_DIR}/ and {MANIFEST}; "
        f"timesteps {low}..{high} of T={manifest.schedule.num_timesteps}, image "
        f"{'x'.join(map(str, manifest.image_shape))}, schedule hash {manifest.schedule_hash}"
    )
    return 0
