"""`saliency-server bench`: its command-line options, the run, the report."""

from __future__ import annotations

import argparse
import shlex

from benchmarks.options import COMPARISONS, SECTIONS, BenchOptions


def command_line(args: argparse.Namespace) -> str:
    """The command as typed (rebuilt from the parsed options, so it is the same however the CLI was invoked)."""
    words = ["saliency-server", "bench"]
    for name in ("models", "config", "device", "dtype", "image", "duration_s", "warmup_s", "requests",
                 "concurrency", "peer_rounds", "skip", "methods", "comparisons", "output_json", "output_md"):
        value = getattr(args, name)
        if value is None or value == set():
            continue
        flag = "--" + name.replace("_", "-")
        if name == "models":
            words += [flag, *value]
        elif isinstance(value, (list, set)):
            words += [flag, ",".join(str(v) for v in (sorted(value) if isinstance(value, set) else value))]
        else:
            words += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    if args.smoke:
        words.append("--smoke")
    return shlex.join(words)


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    unknown = set(args.skip) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"--skip: unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    unknown = set(args.comparisons or ()) - set(COMPARISONS)
    if unknown:
        raise SystemExit(f"--comparisons: unknown comparisons {sorted(unknown)}; choose from {', '.join(COMPARISONS)}")
    values = {
        "models": args.models, "config": args.config, "device": args.device, "dtype": args.dtype,
        "image": args.image, "duration_s": args.duration_s, "warmup_s": args.warmup_s, "requests": args.requests,
        "concurrency": args.concurrency, "peer_rounds": args.peer_rounds, "skip": set(args.skip), "methods": args.methods,
        "comparisons": args.comparisons, "output_json": args.output_json,
        "output_md": args.output_md,
        "command": command_line(args),
    }
    if args.smoke:
        return BenchOptions.smoke_preset(**values)
    return BenchOptions(**{k: v for k, v in values.items() if v is not None})


def run_from_args(args: argparse.Namespace) -> int:
    from benchmarks.runner import run_benchmark, write_outputs

    options = options_from_args(args)
    report = run_benchmark(options)
    print(write_outputs(report, options))
    return 0


def _csv_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_bench_parser(commands: argparse._SubParsersAction) -> None:
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
    bench.add_argument("--peer-rounds", type=int, metavar="N",
                       help="rounds of the comparison with LitServe and the plain handler, each running every system "
                       "at every client count (default 2)")
    bench.add_argument("--skip", type=lambda t: {s.strip() for s in t.split(",") if s.strip()}, default=set(),
                       help=f"comma-separated sections to leave out: {', '.join(SECTIONS)}")
    names = lambda t: {s.strip() for s in t.split(",") if s.strip()}  # noqa: E731
    bench.add_argument("--methods", type=names, metavar="NAMES",
                       help="explanation cost of these registered methods only (comma-separated; default: all)")
    bench.add_argument("--comparisons", type=names, metavar="NAMES",
                       help=f"reference comparisons to run (comma-separated, default all): {', '.join(COMPARISONS)}")
    bench.add_argument("--smoke", action="store_true",
                       help="a tiny model and a few requests: checks that everything runs (timings meaningless)")
    bench.add_argument("--output-json", help="write the full report as JSON here")
    bench.add_argument("--output-md", help="write the markdown report here (it is always printed)")
    bench.set_defaults(handler=run_from_args)
