"""`digitlab serve`: the HTTP API and the draw-a-digit page."""

from __future__ import annotations

import argparse

from digitlab.cli._options import add_device_argument, add_model_argument
from digitlab.serve_limits import CLIENT_TIMEOUT, MAX_CONNECTIONS, TIME_BUDGET


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve the HTTP API and the draw-a-digit page",
        description="Serve POST /v1/predict, GET /v1/model, /healthz, /readyz, the API docs at /docs "
        "and a page at / to draw digits on, until Ctrl+C or SIGTERM.",
    )
    add_model_argument(parser, positional=False)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    parser.add_argument(
        "--workers", type=int, default=1, help="worker processes, each with the model (default: 1)"
    )
    parser.add_argument(
        "--api-key",
        help="require this key on /v1/ routes ('Authorization: Bearer KEY' or 'X-API-Key: KEY'); "
        "default: the DIGITLAB_API_KEY environment variable, which keeps it out of the process list",
    )
    parser.add_argument(
        "--open",
        action="store_true",
        help="serve a non-loopback --host without an API key, deliberately open to anyone who can reach it",
    )
    parser.add_argument(
        "--trusted-host",
        action="append",
        metavar="NAME",
        help="a Host header value to accept (repeatable; '*' for any; default: localhost, 127.0.0.1 and "
        "--host, any for 0.0.0.0)",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=MAX_CONNECTIONS,
        help=f"connections and requests in progress beyond which new ones get 503 (default {MAX_CONNECTIONS})",
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=TIME_BUDGET,
        metavar="S",
        help=f"seconds one request's images may take to preprocess, else 413 (default {TIME_BUDGET:g})",
    )
    parser.add_argument(
        "--client-timeout",
        type=float,
        default=CLIENT_TIMEOUT,
        metavar="S",
        help="seconds a client may take to send its headers or pause within its body, and an idle "
        f"connection stays open (default {CLIENT_TIMEOUT:g})",
    )
    add_device_argument(parser)
    parser.add_argument(
        "--runs-dir",
        metavar="DIR",
        help="also show the training runs in DIR on the page (their curves, live) and draw against their models",
    )
    parser.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from digitlab.serve import Limits, serve

    serve(
        args.model,
        host=args.host,
        port=args.port,
        workers=args.workers,
        api_key=args.api_key,
        open_access=args.open,
        trusted_hosts=args.trusted_host,
        limits=Limits(time_budget=args.time_budget, client_timeout=args.client_timeout),
        max_connections=args.max_connections,
        device=args.device,
        runs_dir=args.runs_dir,
    )
    return 0
