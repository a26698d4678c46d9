"""``thaw-agents`` on the command line.

thaw-agents model prepare      prepare the default model (once, ~30 s)
thaw-agents model path         print the default model's folder (preparing it if needed)
thaw-agents info PATH          print a snapshot's manifest in a readable form
thaw-agents freeze MODEL --output FILE
                               write MODEL's weights to a .thaw file (restore with
                               LLM(MODEL, load_format="thaw", model_loader_extra_config={"snapshot": FILE}))
thaw-agents snapshots list|rm|export|import
                               the local snapshot store (THAW_AGENTS_STORE)
thaw-agents serve [MODEL] [--host H] [--port P] [--api-key KEY] [vLLM server options]
                               vLLM's OpenAI server with thaw and the /v1/thaw snapshot routes
thaw-agents bench NAME [options]
                               run benchmarks/NAME.py (from a source checkout)

The commands that start an engine (serve, freeze, bench) send vLLM's log lines to a file under
~/.cache/thaw-agents/logs (THAW_AGENTS_LOGS moves it) and say where on stderr; ``-v`` before the
command (``thaw-agents -v serve``) keeps them on the terminal.

Exit status: 0 on success, 1 on an error (one line on stderr), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

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
    from ._container_reader import verify_regions
    from ._manifest import read_kv_manifest

    manifest = read_kv_manifest(args.path)
    if args.verify:
        verify_regions(manifest.container)
    if args.json:
        # ASCII only: a header string cannot carry a terminal escape to the reader's screen.
        print(json.dumps(manifest.container.header, indent=2, sort_keys=True, ensure_ascii=True))
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
        # Every value may hold header strings: escaped, so a newline cannot fake a line.
        print(f"{key:<{width}}  {_printable(value)}")
    return 0


def _printable(text: object) -> str:
    """``text`` with control and non-printable characters (escapes, newlines, lone surrogates)
    written as Python escapes, as ``ascii()`` would; printable non-ASCII text stays readable."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in str(text))


def _cmd_freeze(args: argparse.Namespace) -> int:
    import time

    from ._errors import EngineError, ThawError
    from .weights import freeze_model, read_weights_manifest

    _check_freeze_args(args.model, args.output)
    _quiet_engine_logs("freeze", args.verbose)
    start = time.perf_counter()
    model = None if args.model == "default" else args.model
    kwargs = {"dtype": args.dtype} if args.dtype else {}
    if args.tensor_parallel_size > 1:
        kwargs["tensor_parallel_size"] = args.tensor_parallel_size
    try:
        path = freeze_model(model, args.output, **kwargs)
    except (ThawError, OSError):
        raise
    except Exception as exc:  # vLLM and transformers report a bad model in many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise EngineError(
            f"could not freeze {model or 'the default model'}: {type(exc).__name__}: {first}"
        ) from exc
    ranks = [read_weights_manifest(path.replace("{rank}", str(r))) for r in range(args.tensor_parallel_size)]
    manifest = ranks[0]
    per_rank = f" ({len(ranks)} tensor-parallel ranks, a file each)" if len(ranks) > 1 else ""
    summary = (
        f"froze {len(manifest.tensors)} tensors, {sum(m.nbytes for m in ranks):,} bytes of "
        f"{manifest.model_name} to {path}{per_rank} in {time.perf_counter() - start:.1f} s"
    )
    print(_printable(summary))
    return 0


def _check_freeze_args(model: str, output: str) -> None:
    """Refuse a missing model folder or output folder before loading anything (seconds of
    engine start-up for an error that a stat can give)."""
    from ._errors import ConfigError

    if model != "default":
        looks_like_path = model.startswith(("/", ".", "~")) or model.endswith("/") or model.count("/") > 1
        if os.path.exists(model) and not os.path.isdir(model):
            raise ConfigError(f"{model} is not a folder; give a Hugging Face model folder or id")
        if looks_like_path and not os.path.isdir(os.path.expanduser(model)):
            raise ConfigError(f"no model folder at {model}; give a Hugging Face model folder or id")
    folder = os.path.dirname(os.path.abspath(output)) or "."
    if not os.path.isdir(folder):
        raise ConfigError(f"the output folder {folder} does not exist; create it first")


def _cmd_snapshots(args: argparse.Namespace) -> int:
    import time

    from ._fork import ForkHandle
    from ._store import SUFFIX, resolve_chain, store_dir

    store = store_dir()
    if args.action == "list":
        rows = []
        for path in sorted(store.glob("thaw-*" + SUFFIX)):
            sid = path.name.removesuffix(SUFFIX)
            try:
                leaf = resolve_chain(store, sid)[-1]
                st = path.stat()
            except Exception as exc:  # listed, with why it cannot be used
                rows.append({"id": sid, "error": str(exc)})
                continue
            bs = leaf.spec.block_size
            rows.append(
                {
                    "id": sid,
                    "num_tokens": leaf.end_block * bs + len(leaf.tail_token_ids),
                    "nbytes": st.st_size,
                    "parent": leaf.parent.snapshot_id if leaf.parent else None,
                    "written": int(st.st_mtime),
                    "model": leaf.spec.model_name,
                }
            )
        if args.json:
            print(json.dumps({"store": str(store), "snapshots": rows}, indent=2, ensure_ascii=True))
            return 0
        print(f"{len(rows)} snapshots in {store}")
        for row in rows:
            if "error" in row:
                print(f"  {row['id']}  unusable: {_printable(row['error'])}")
                continue
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(row["written"]))
            parent = f"  parent {row['parent']}" if row["parent"] else ""
            print(
                f"  {row['id']}  {row['num_tokens']:>7,} tokens  {row['nbytes']:>13,} bytes"
                f"  written {when}{parent}"
            )
        return 0
    if args.action == "rm":
        for sid in args.ids:
            ForkHandle.from_id(sid).delete()  # an unknown id is an error, before anything else goes
            print(f"removed {sid}")
        return 0
    if args.action == "export":
        handle = ForkHandle.from_id(args.ids[0], verify=True)
        print(handle.save(args.dest))
        return 0
    handle = ForkHandle.load(args.ids[0])
    print(handle.id)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import subprocess

    from ._errors import ConfigError

    folder = Path(__file__).resolve().parent.parent / "benchmarks"
    names = (
        sorted(p.stem for p in folder.glob("*.py") if not p.name.startswith("_")) if folder.is_dir() else []
    )
    if not names:
        raise ConfigError("the benchmarks ship with the source tree: run this from a checkout of thaw-agents")
    if args.name not in names:
        raise ConfigError(f"no benchmark {args.name!r}; choose one of: {', '.join(names)}")
    _quiet_engine_logs("bench", args.verbose)
    return subprocess.call([sys.executable, str(folder / f"{args.name}.py"), *args.options])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thaw-agents", description="Fork a live LLM session.")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="vLLM's log lines on the terminal (default: a log file)"
    )
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
    snaps = sub.add_parser("snapshots", help="the local snapshot store (THAW_AGENTS_STORE)")
    snaps_sub = snaps.add_subparsers(dest="action", required=True)
    listing = snaps_sub.add_parser("list", help="every snapshot: id, tokens, bytes, when written")
    listing.add_argument("--json", action="store_true")
    remove = snaps_sub.add_parser("rm", help="remove snapshots by id")
    remove.add_argument("ids", nargs="+", metavar="ID")
    export = snaps_sub.add_parser(
        "export", help="copy a snapshot (and its ancestors beside it) to a path or URI"
    )
    export.add_argument("ids", nargs=1, metavar="ID")
    export.add_argument("dest", metavar="FILE")
    imports = snaps_sub.add_parser(
        "import", help="check a .thaw file and bring it into the store; prints its id"
    )
    imports.add_argument("ids", nargs=1, metavar="FILE")
    snaps.set_defaults(func=_cmd_snapshots)
    sub.add_parser(
        "serve",
        help="vLLM's OpenAI server with thaw (thaw-agents serve --help)",
        add_help=False,
    )
    bench = sub.add_parser("bench", help="run a benchmark script (benchmarks/NAME.py)")
    bench.add_argument("name")
    bench.add_argument("options", nargs=argparse.REMAINDER, help="passed to the script")
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from ._errors import ThawError

    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = False
    while argv[:1] and argv[0] in ("-v", "--verbose"):
        verbose = True
        argv.pop(0)
    try:
        if argv[:1] == ["serve"]:  # every option it does not know goes to vLLM's own parser
            from .serve.launch import main as serve

            return serve(argv[1:], before_start=lambda: _quiet_engine_logs("serve", verbose))
        args = _parser().parse_args(argv)
        args.verbose = verbose or args.verbose
        return int(args.func(args))
    except (ThawError, OSError) as exc:
        # One line, escaped (the message may quote a file's strings or a hostile path).
        message = str(exc) if isinstance(exc, ThawError) else _os_error(exc)
        print(f"thaw-agents: error: {_printable(message)}", file=sys.stderr)
        return 1


def _quiet_engine_logs(command: str, verbose: bool) -> None:
    """Unless ``-v``: vLLM's ~150 start-up lines go to a log file, named once on stderr.

    Called by the commands that start an engine, once their arguments are checked (a usage
    error stays one line)."""
    if verbose:
        return
    from ._logfile import send_vllm_logs_to_file

    path = send_vllm_logs_to_file(command)
    print(f"thaw-agents: vLLM's log: {path} (thaw-agents -v {command} shows it here)", file=sys.stderr)


def _os_error(exc: OSError) -> str:
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror or exc}"


if __name__ == "__main__":
    sys.exit(main())
