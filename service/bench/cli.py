"""`saliency-server bench`: options from the command line, the run, the report."""

from __future__ import annotations

import argparse
import shlex

from service.bench.options import SECTIONS, BenchOptions


def command_line(args: argparse.Namespace) -> str:
    """The command as typed (rebuilt from the parsed options, so it is the same however the CLI was invoked)."""
    words = ["saliency-server", "bench"]
    for name in ("models", "config", "device", "dtype", "image", "duration_s", "warmup_s", "requests",
                 "concurrency", "skip", "output_json", "output_md"):
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
    values = {
        "models": args.models, "config": args.config, "device": args.device, "dtype": args.dtype,
        "image": args.image, "duration_s": args.duration_s, "warmup_s": args.warmup_s, "requests": args.requests,
        "concurrency": args.concurrency, "skip": set(args.skip), "output_json": args.output_json,
        "output_md": args.output_md,
        "command": command_line(args),
    }
    if args.smoke:
        return BenchOptions.smoke_preset(**values)
    return BenchOptions(**{k: v for k, v in values.items() if v is not None})


def run_from_args(args: argparse.Namespace) -> int:
    from service.bench.runner import run_benchmark, write_outputs

    options = options_from_args(args)
    report = run_benchmark(options)
    print(write_outputs(report, options))
    return 0
