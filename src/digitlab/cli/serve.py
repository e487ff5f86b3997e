"""`digitlab serve`: the HTTP API and the draw-a-digit page."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve the HTTP API and the draw-a-digit page",
        description="Serve POST /v1/predict, GET /v1/model, /healthz, /readyz, the API docs at /docs "
        "and a page at / to draw digits on, until Ctrl+C or SIGTERM.",
    )
    parser.add_argument("--model", help="model file (.safetensors or exported .onnx; default: bundled)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    parser.add_argument(
        "--workers", type=int, default=1, help="worker processes, each with the model (default: 1)"
    )
    parser.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from digitlab.serve import serve

    serve(args.model, host=args.host, port=args.port, workers=args.workers)
    return 0
