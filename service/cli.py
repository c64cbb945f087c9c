"""Command line: `saliency-server serve [--config FILE] [--host HOST] [--port PORT]` and `saliency-server bench`."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import create_app
    from service.config import load_settings

    overrides = {k: v for k, v in {"host": args.host, "port": args.port}.items() if v is not None}
    settings = load_settings(args.config, **overrides)
    level = "DEBUG" if settings.log_level == "trace" else settings.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, timeout_graceful_shutdown=30)
    return 0


def _csv_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _bench(args: argparse.Namespace) -> int:
    from service.bench.cli import run_from_args

    return run_from_args(args)


def _add_bench_parser(commands: argparse._SubParsersAction) -> None:
    from service.bench.options import SECTIONS

    bench = commands.add_parser(
        "bench", help="benchmark serving, batching, explanation cost and reference libraries",
        description="Start the server on loopback (random weights unless --config), load it over HTTP, time the "
        "explanation methods in process and compare them with reference libraries; print a markdown report.",
    )
    bench.add_argument("--models", nargs="+", metavar="MODEL",
                       help="timm architectures to serve with random weights (default deit_tiny_patch16_224), "
                       "or model ids of --config (default: all of its models)")
    bench.add_argument("--config", help="serve the models (and settings) of this configuration file instead")
    bench.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the config's, else auto)")
    bench.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                       help="model dtype (default: the config's, else float32; half types need CUDA)")
    bench.add_argument("--image", help="photo to send (default: shared/images/chelsea.png beside the checkout, "
                       "else scikit-image's chelsea)")
    bench.add_argument("--duration-s", type=float, help="measurement window of each HTTP load point (default 10)")
    bench.add_argument("--warmup-s", type=float, help="un-counted warm-up before each window (default 2)")
    bench.add_argument("--requests", type=int, help="end each load point after this many successful requests")
    bench.add_argument("--concurrency", type=_csv_ints, help="client counts of the /predict runs (default 1,8,32)")
    bench.add_argument("--skip", type=lambda t: {s.strip() for s in t.split(",") if s.strip()}, default=set(),
                       help=f"comma-separated sections to leave out: {', '.join(SECTIONS)}")
    bench.add_argument("--smoke", action="store_true",
                       help="a tiny model and a few requests: checks that everything runs (timings meaningless)")
    bench.add_argument("--output-json", help="write the full report as JSON here")
    bench.add_argument("--output-md", help="write the markdown report here (it is always printed)")
    bench.set_defaults(handler=_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saliency-server", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--config", help="TOML or YAML configuration file (default: the packaged default models)")
    serve.add_argument("--host", help="bind address (default 127.0.0.1, or SALIENCY_HOST)")
    serve.add_argument("--port", type=int, help="port (default 8000, or SALIENCY_PORT)")
    serve.set_defaults(handler=_serve)
    _add_bench_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
