"""``thaw-agents serve``: vLLM's own OpenAI-compatible server, with thaw switched on.

It adds to vLLM's arguments what :func:`thaw_agents.engine_kwargs` adds to an engine (prefix
caching, the thaw connector with its store, the worker extension, the CPU defaults), turns on
``prompt_tokens_details``, and allowlists the two thaw plugins in ``VLLM_PLUGINS`` (the weights
loader and the snapshot routes). Anything it does not know goes to vLLM's own parser untouched,
so every vLLM server option works. Without an API key it listens on loopback only.

The same server with plain vLLM::

    VLLM_PLUGINS=thaw_agents_weights,thaw_agents_snapshots THAW_AGENTS_STORE=/srv/thaw \\
      python -m vllm.entrypoints.openai.api_server --model MODEL --enable-prefix-caching \\
      --enable-prompt-tokens-details --api-key KEY \\
      --kv-transfer-config '{"kv_connector":"ThawConnector","kv_role":"kv_both",
                             "kv_load_failure_policy":"recompute"}' \\
      --worker-extension-cls thaw_agents.connector.worker_extension.ThawWorkerExtension
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .._errors import ConfigError
from .plugin import PLUGIN_NAME

__all__ = ["build_vllm_argv", "main", "parser"]

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_PLUGINS = ("thaw_agents_weights", PLUGIN_NAME)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="thaw-agents serve",
        usage="thaw-agents serve [MODEL] [--host H] [--port P] [--api-key KEY] [--store DIR] "
        "[--store-max-gib N] [--weights NAME=FILE ...] [--weights-dir DIR] [vLLM server options]",
        description="vLLM's OpenAI-compatible server with the thaw connector and /v1/thaw snapshot routes. "
        "Options not listed here are passed to vLLM's server (see its --help).",
    )
    # MODEL is taken by hand (see _prepare): an optional positional would swallow the value of
    # any vLLM option argparse does not know (`--max-model-len 4096`).
    p.add_argument("--model", dest="model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--host", default="127.0.0.1", help="listen address (default: loopback)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=os.environ.get("VLLM_API_KEY"),
        help="required as 'Authorization: Bearer KEY' on every /v1 route; without one, loopback only",
    )
    p.add_argument("--store", default=None, help="the snapshot store folder (default: THAW_AGENTS_STORE)")
    p.add_argument(
        "--store-max-gib",
        type=float,
        default=None,
        help="evict least recently used snapshots past this size (default: a fifth of the disk, at most 200)",
    )
    p.add_argument(
        "--weights",
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="serve a weights snapshot of MODEL's architecture under NAME (repeatable); a request's "
        "'model' picks one, the server swaps when another is loaded; the first is loaded at start",
    )
    p.add_argument(
        "--weights-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder POST /v1/thaw/weights may register files from (besides those of --weights)",
    )
    return p


def _weights_env(args: argparse.Namespace) -> str | None:
    """The ``--weights`` registry for the server process (files checked now: one-line errors)."""
    from .weights import parse_weights_args

    names = parse_weights_args(args.weights)
    folders = [os.path.dirname(path) for path in names.values()]
    for folder in args.weights_dir:
        if not os.path.isdir(folder):
            raise ConfigError(f"--weights-dir {folder}: no such folder")
        folders.append(os.path.abspath(folder))
    if not names and not folders:
        return None
    return json.dumps({"names": names, "folders": list(dict.fromkeys(folders))})


def build_vllm_argv(args: argparse.Namespace, passthrough: Sequence[str], store: str) -> list[str]:
    """vLLM server arguments: thaw's first, the user's after them (the last one given wins)."""
    from .._engine import engine_kwargs

    kw = engine_kwargs(args.model, kv_connector_extra_config={"store": store})
    argv = [
        "--model",
        str(kw.pop("model")),
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--enable-prefix-caching",
        "--enable-prompt-tokens-details",
        "--kv-transfer-config",
        json.dumps(kw.pop("kv_transfer_config")),
        "--worker-extension-cls",
        kw.pop("worker_extension_cls"),
    ]
    kw.pop("enable_prefix_caching", None)
    for key, value in kw.items():  # the CPU defaults: enforce_eager, block_size, dtype, KV cache size
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value not in (False, None):
            argv += [flag, str(value)]
    if args.api_key:
        argv += ["--api-key", args.api_key]
    # Compact guided JSON, as ChatThaw in-process: whitespace between JSON tokens is allowed or not
    # engine-wide only, and a small model spends dozens of tokens on it.
    argv += [
        "--structured-outputs-config",
        json.dumps({"backend": "xgrammar", "disable_any_whitespace": True}),
    ]
    return [*argv, *passthrough]


def _prepare(argv: Sequence[str] | None) -> tuple[list[str], dict[str, str]]:
    from .._store import open_store

    argv = list(argv or [])
    model = argv.pop(0) if argv and not argv[0].startswith("-") else None
    args, passthrough = parser().parse_known_args(argv)
    args.model = args.model or model
    if not args.api_key and args.host not in _LOOPBACK:
        raise ConfigError(
            f"refusing to listen on {args.host} without an API key: the /v1/thaw routes read and write "
            "snapshots. Pass --api-key KEY (or set VLLM_API_KEY), or keep the default --host 127.0.0.1"
        )
    store = open_store(args.store)
    env = {"THAW_AGENTS_STORE": str(store)}
    if args.store_max_gib is not None:
        if args.store_max_gib <= 0:
            raise ConfigError("--store-max-gib must be positive")
        env["THAW_AGENTS_STORE_MAX_BYTES"] = str(int(args.store_max_gib * (1 << 30)))
    weights = _weights_env(args)
    if weights is not None:
        from .weights import WEIGHTS_ENV

        env[WEIGHTS_ENV] = weights
    plugins = [p for p in os.environ.get("VLLM_PLUGINS", "").split(",") if p]
    env["VLLM_PLUGINS"] = ",".join(dict.fromkeys([*plugins, *_PLUGINS]))
    return build_vllm_argv(args, passthrough, str(store)), env


def main(argv: Sequence[str] | None = None, *, before_start: Callable[[], None] | None = None) -> int:
    """Run the server until it is stopped (Ctrl-C or SIGTERM).

    ``before_start`` runs once the arguments are checked (the CLI routes vLLM's logs there, so a
    usage error stays one line).
    """
    vllm_argv, env = _prepare(argv)
    if before_start is not None:
        before_start()
    os.environ.update(env)
    run_vllm_server(vllm_argv)
    return 0


def run_vllm_server(argv: list[str]) -> None:
    import uvloop
    from vllm.entrypoints.launchers.api_server.entry import run_server
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    vllm_parser = make_arg_parser(FlexibleArgumentParser(prog="thaw-agents serve"))
    args: Any = vllm_parser.parse_args(argv)
    validate_parsed_serve_args(args)
    print(
        f"thaw-agents serve: {args.model} on http://{args.host}:{args.port} "
        f"(snapshots: {os.environ['THAW_AGENTS_STORE']}, routes /v1/thaw/snapshots)",
        file=sys.stderr,
        flush=True,
    )
    uvloop.run(run_server(args))
