"""`leanseq serve MODEL_DIR`: the streaming server (needs the `leanseq[serve]` extra: fastapi, uvicorn,
prometheus-client).

    leanseq serve leanseq/data/shakespeare-mamba --api-key secret            # http://127.0.0.1:8000
    leanseq serve MODEL_DIR --api-keys-file keys.txt --db sessions.db --host 0.0.0.0 --port 8080

Threads: one torch thread by default. A served model's steps are small; with two or more torch threads a step
waits on every thread, and one busy core (another process, the HTTP side) stalls them all: on a 2-core machine
the reference measurement saw 40-250x slower steps with 2 threads and a core taken, where 1 thread slows by at
most the share it loses. Scale with processes (replicas), not threads.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from leanseq.argtypes import int_at_least, positive_float, positive_int


def _port(text: str) -> int:
    value = int_at_least(0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is 0-65535, got {text!r}")
    return value


def _read_keys(path: str) -> set[str]:
    keys = set()
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keys.add(line)
    if not keys:
        raise ValueError(f"{path} holds no API keys (one per line; # starts a comment)")
    return keys


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a model over HTTP: OpenAI-compatible text endpoints and "
                              "durable streaming sessions",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL_DIR", help="checkpoint folder or Hub id in the local cache")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", action="append", default=[], help="an accepted API key (repeatable; also env "
                   "LEANSEQ_API_KEY)")
    p.add_argument("--api-keys-file", help="a file of accepted API keys, one per line")
    p.add_argument("--no-auth", action="store_true", help="accept requests without a key (loopback only)")
    p.add_argument("--db", default="leanseq-sessions.db", help="SQLite session store (default leanseq-sessions.db)")
    p.add_argument("--sync", choices=("normal", "full"), default="normal",
                   help="SQLite synchronous mode: normal survives a killed process, full also a power cut "
                   "(default normal)")
    p.add_argument("--name", help="model name in /v1/models (default: the folder's name)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1; see the help text)")
    p.add_argument("--max-tokens-per-request", type=positive_int, default=4096)
    p.add_argument("--max-sessions-per-key", type=positive_int, default=10000)
    p.add_argument("--max-body-bytes", type=positive_int, default=8 << 20)
    p.add_argument("--max-concurrent-streams", type=positive_int, default=256)
    p.add_argument("--idle-seconds", type=positive_float, default=300.0, help="idle sessions leave memory after this "
                   "(they stay in the store)")
    p.add_argument("--max-live", type=positive_int, default=4096, help="sessions held in memory at most")
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                   help="JSON access-log lines on stderr (default on)")
    p.set_defaults(func=run_serve)


def build(args):
    """(engine, app, config) from parsed arguments; shared by the command and the tests."""
    import torch

    import leanseq
    from leanseq.energy import Meter
    from leanseq.models import hub
    from leanseq.serve.app import ServeConfig, create_app
    from leanseq.serve.batching import Engine
    from leanseq.serve.store import SQLiteStore

    torch.set_num_threads(args.threads)
    keys = set(args.api_key)
    if os.environ.get("LEANSEQ_API_KEY"):
        keys.add(os.environ["LEANSEQ_API_KEY"])
    if args.api_keys_file:
        keys |= _read_keys(args.api_keys_file)
    if not keys and not args.no_auth:
        raise ValueError("give an API key (--api-key KEY, --api-keys-file FILE or env LEANSEQ_API_KEY), or "
                         "--no-auth to serve without keys on loopback")
    if args.no_auth and args.host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"--no-auth serves anyone who can connect; refused on {args.host} (use loopback or keys)")
    folder = hub.resolve(args.model)
    if (Path(folder) / "series_config.json").is_file():  # a leanseq.series.SeriesModel: observations in
        from leanseq.series.encoder import SeriesModel, class_names

        model, metadata = SeriesModel.load(folder, with_metadata=True)  # the load checks any class names
        tokenizer, names = None, class_names(model, metadata, folder)
    else:
        model, names = leanseq.load(folder), None
        try:
            from leanseq.text.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(folder)
        except FileNotFoundError:
            tokenizer = None  # a token-id model: sessions work, the text endpoints answer 400
    store = SQLiteStore(args.db, synchronous=args.sync)
    engine = Engine(model, store, tokenizer=tokenizer, class_names=names,
                    max_sessions_per_key=args.max_sessions_per_key, idle_seconds=args.idle_seconds, max_live=args.max_live,
                    meter=Meter(reset_peak_rss=False, track_rss=False))  # no /proc reads per round
    config = ServeConfig(model_name=args.name or Path(folder).name, api_keys=keys, no_auth=args.no_auth,
                         max_tokens_per_request=args.max_tokens_per_request, max_body_bytes=args.max_body_bytes,
                         max_concurrent_streams=args.max_concurrent_streams)
    return engine, create_app(engine, config), config


def setup_logging(access: bool) -> None:
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access_logger = logging.getLogger("leanseq.serve.access")
    access_logger.handlers[:] = [handler]
    access_logger.propagate = False
    access_logger.setLevel(logging.INFO if access else logging.WARNING)
    engine_logger = logging.getLogger("leanseq.serve")
    if not engine_logger.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("leanseq serve: %(levelname)s: %(message)s"))
        engine_logger.addHandler(h)
        engine_logger.setLevel(logging.INFO)


FULL_GC_EVERY = 100  # young-generation (gen 1) collections between full ones; Python's default is 10


def settle_garbage_collector() -> None:
    """Garbage-collector settings for serving, called once everything long-lived is loaded.

    gc.freeze(): everything loaded so far (torch, the model, the app) lives as long as the server; kept out of
    the collector's full passes, which otherwise scan it all and stalled a round by ~90 ms under load.
    A full pass at most every FULL_GC_EVERY gen-1 collections instead of Python's 10: a full pass still scans
    every open connection's objects (15-20 ms with 256 WebSockets open, timed with gc.callbacks) and stops the
    server meanwhile. With 256 streams pushing there was a gen-1 collection every ~0.3 s, so a full pass could
    come every ~3 s: in two load-test runs (context 1,024) one landed in the timed second each time (p99 91 and
    105 ms), in two with this setting none did (42 and 35 ms). Cyclic garbage is still collected, by the young passes and by the
    (now rarer: at most every ~30 s under that load) full ones."""
    import gc

    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_GC_EVERY)


def run_serve(args) -> int:
    import socket

    import uvicorn

    engine, app, config = build(args)
    setup_logging(args.access_log)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as exc:
        engine.stop()
        raise OSError(f"cannot listen on {args.host}:{args.port}: {exc.strerror}") from exc
    host, port = sock.getsockname()[:2]
    kind = (f", series model: {engine.model.channels} channel(s) in, {engine.model.task} out" if engine.series
            else ", no tokenizer" if engine.tokenizer is None else "")
    print(f"leanseq serve: {config.model_name} ({sum(p.numel() for p in engine.model.parameters()):,} parameters"
          f"{kind}) on http://{host}:{port} "
          f"(store {args.db}, {len(engine.owners)} stored sessions)", file=sys.stderr, flush=True)
    settle_garbage_collector()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                           timeout_graceful_shutdown=10,
                                           ws_per_message_deflate=False))  # deflate costs more than it saves on small messages
    server.run(sockets=[sock])
    return 0
