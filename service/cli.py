"""Command line: `saliency-server serve [--config FILE] [--host HOST] [--port PORT]`, `saliency-server bench` and
`saliency-server evaluate`."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from service.config import ServerSettings


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.config import load_settings
    from service.http.app import create_app
    from service.http.logs import configure_logging
    from service.http.serving import DrainingServer

    overrides = {k: v for k, v in {"host": args.host, "port": args.port}.items() if v is not None}
    settings = load_settings(args.config, **overrides)
    # One handler and format (log_format) for the app's records and uvicorn's, set now and again by uvicorn.
    log_config = configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings)

    def start_draining() -> bool:
        state = getattr(app.state, "service", None)  # None until the lifespan has started
        return state is not None and state.start_draining()

    config = uvicorn.Config(app, **uvicorn_options(settings), log_config=log_config)
    DrainingServer(config, start_draining, settings.drain_s).run()
    return 0


def uvicorn_options(settings: ServerSettings) -> dict[str, Any]:
    """uvicorn.run's keyword arguments for the settings: where to listen and how long to wait for clients."""
    from service.http.protocol import protocol_class

    return {
        "host": settings.host, "port": settings.port, "log_level": settings.log_level,
        "access_log": False,  # the app writes one access line per request itself (service/http/observation.py)
        "timeout_graceful_shutdown": 30,
        "timeout_keep_alive": settings.keep_alive_timeout_s,  # idle keep-alive connections closed after this
        # uvicorn's httptools protocol plus a header deadline and JSON answers to unparseable requests
        "http": protocol_class(settings.header_timeout_s),
    }


def _add_bench_parser(commands: argparse._SubParsersAction) -> None:
    """`bench` comes from the `benchmarks` package beside the service (installed with the project, not in the
    server image); without it the command says so."""
    try:
        from benchmarks.cli import add_bench_parser
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] != "benchmarks":
            raise
        # Takes whatever options were given (no option prefix: none is parsed) and answers with the way to install.
        bench = commands.add_parser("bench", help="benchmarks (not installed here)", prefix_chars="\0", add_help=False)
        bench.add_argument("options", nargs="*")
        bench.set_defaults(handler=_no_benchmarks)
        return
    add_bench_parser(commands)


def _add_evaluate_parser(commands: argparse._SubParsersAction) -> None:
    """`evaluate` comes from the `benchmarks` package too (benchmarks.quality); without it the command says so."""
    try:
        from benchmarks.quality.cli import add_evaluate_parser
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] != "benchmarks":
            raise
        evaluate = commands.add_parser("evaluate", help="saliency quality evaluation (not installed here)",
                                       prefix_chars="\0", add_help=False)
        evaluate.add_argument("options", nargs="*")
        evaluate.set_defaults(handler=lambda _: _no_benchmarks(_, "evaluate"))
        return
    add_evaluate_parser(commands)


def _no_benchmarks(_: argparse.Namespace, command: str = "bench") -> int:
    print(f"saliency-server {command}: the `benchmarks` package is not installed; install the project from its "
          "repository with `pip install -e '.[bench]'`", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saliency-server", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--config", help="TOML or YAML configuration file (default: the packaged default models)")
    serve.add_argument("--host", help="bind address (default 127.0.0.1, or SALIENCY_HOST)")
    serve.add_argument("--port", type=int, help="port (default 8000, or SALIENCY_PORT)")
    serve.set_defaults(handler=_serve)
    _add_bench_parser(commands)
    _add_evaluate_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
