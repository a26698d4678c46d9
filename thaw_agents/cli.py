"""``thaw-agents`` on the command line.

thaw-agents model prepare      prepare the default model (once, ~30 s)
thaw-agents model path         print the default model's folder (preparing it if needed)
thaw-agents info PATH          print a snapshot's manifest in a readable form
thaw-agents freeze MODEL --output FILE
                               write MODEL's weights to a .thaw file (restore with
                               LLM(MODEL, load_format="thaw", model_loader_extra_config={"snapshot": FILE}))
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _cmd_model(args: argparse.Namespace) -> int:
    from .models import default_model, prepare_default_model

    if args.action == "prepare":
        path = prepare_default_model(force=args.force)
    else:
        path = default_model(progress=False)
    print(path)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from ._container import verify_regions
    from ._manifest import read_kv_manifest

    manifest = read_kv_manifest(args.path)
    if args.verify:
        verify_regions(manifest.container)
    if args.json:
        print(json.dumps(manifest.container.header, indent=2, sort_keys=True))
        return 0
    spec = manifest.spec
    tokens = len(manifest.token_ids) + len(manifest.tail_token_ids)
    rows = [
        ("snapshot", manifest.snapshot_id),
        ("file", manifest.path),
        ("created by", manifest.created_by),
        (
            "format",
            f"thaw v{manifest.container.header['format_version']}, {manifest.container.kind}",
        ),
        ("model", f"{spec.model_name}  ({spec.model_fingerprint})"),
        ("engine", f"vLLM {spec.vllm_version}, {spec.platform}, layout {spec.kv_layout}"),
        (
            "kv",
            f"{spec.dtype}, block size {spec.block_size}, {len(spec.layers)} layers, "
            f"{spec.block_nbytes:,} bytes per block",
        ),
        (
            "blocks",
            f"{manifest.first_block}..{manifest.end_block - 1} ({manifest.num_blocks} in this file)"
            if manifest.num_blocks
            else "none",
        ),
        ("tokens", f"{tokens} in this file ({len(manifest.tail_token_ids)} in the partial tail)"),
        (
            "parent",
            f"{manifest.parent.snapshot_id} ({manifest.parent.num_blocks} blocks)"
            if manifest.parent
            else "none (root)",
        ),
        (
            "payload",
            f"{manifest.container.payload_nbytes:,} bytes, "
            f"{len(manifest.container.regions)} regions, {manifest.container.header['checksum_algorithm']}",
        ),
        ("checksums", "verified" if args.verify else "not checked (--verify)"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _cmd_freeze(args: argparse.Namespace) -> int:
    import time

    from .weights import read_weights_manifest
    from .weights_vllm import freeze_model

    start = time.perf_counter()
    model = None if args.model == "default" else args.model
    kwargs = {"dtype": args.dtype} if args.dtype else {}
    if args.tensor_parallel_size > 1:
        kwargs["tensor_parallel_size"] = args.tensor_parallel_size
    path = freeze_model(model, args.output, **kwargs)
    manifest = read_weights_manifest(path.replace("{rank}", "0"))
    print(
        f"froze {len(manifest.tensors)} tensors, {manifest.nbytes:,} bytes of {manifest.model_name} "
        f"to {path} in {time.perf_counter() - start:.1f} s"
    )
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thaw-agents", description="Fork a live LLM session.")
    sub = parser.add_subparsers(dest="command", required=True)
    model = sub.add_parser("model", help="the default model")
    model.add_argument("action", choices=["prepare", "path"])
    model.add_argument("--force", action="store_true", help="rebuild even if prepared")
    model.set_defaults(func=_cmd_model)
    info = sub.add_parser("info", help="show a snapshot's manifest")
    info.add_argument("path")
    info.add_argument("--json", action="store_true", help="the raw header as JSON")
    info.add_argument("--verify", action="store_true", help="also check every checksum")
    info.set_defaults(func=_cmd_info)
    freeze = sub.add_parser("freeze", help="write a model's weights to a .thaw file")
    freeze.add_argument("model", help="a Hugging Face folder or id, or 'default' for the default model")
    freeze.add_argument("--output", "-o", required=True, help="the .thaw file to write ({rank} per TP rank)")
    freeze.add_argument("--dtype", default=None, help="vLLM dtype (default: the model's)")
    freeze.add_argument("--tensor-parallel-size", type=int, default=1)
    freeze.set_defaults(func=_cmd_freeze)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from ._errors import ThawError

    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ThawError as exc:
        print(f"thaw-agents: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
