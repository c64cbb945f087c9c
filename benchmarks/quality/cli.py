"""`saliency-server evaluate`: its command-line options, the run, the report."""

from __future__ import annotations

import argparse
import shlex

from benchmarks.quality.options import SECTIONS, EvaluateOptions

_VALUED = ("config", "groundtruth_config", "models", "methods", "images", "groundtruth_images", "sanity_images",
           "groundtruth_sanity_images", "sanity_groups", "batch_size", "threads", "seed", "device", "skip",
           "output_json", "output_md", "output_summary")
_FLAGS = ("sanity_expensive", "include_random", "smoke")


def command_line(args: argparse.Namespace) -> str:
    """The command as typed (rebuilt from the parsed options)."""
    words = ["saliency-server", "evaluate"]
    for name in _VALUED:
        value = getattr(args, name)
        if value is None or value == set():
            continue
        if isinstance(value, (list, set)):
            value = ",".join(sorted(value) if isinstance(value, set) else value)
        words += ["--" + name.replace("_", "-"), str(value)]
    words += ["--" + name.replace("_", "-") for name in _FLAGS if getattr(args, name)]
    return shlex.join(words)


def options_from_args(args: argparse.Namespace) -> EvaluateOptions:
    values = {name: getattr(args, name) for name in _VALUED + _FLAGS if name != "smoke"}
    values["skip"] = set(args.skip)
    values["command"] = command_line(args)
    values = {k: v for k, v in values.items() if v is not None and v is not False}
    if args.smoke:
        return EvaluateOptions.smoke_preset(**values)
    return EvaluateOptions(**values)


def run_from_args(args: argparse.Namespace) -> int:
    from benchmarks.quality.runner import run_evaluation, write_outputs

    options = options_from_args(args)
    report = run_evaluation(options)
    print(write_outputs(report, options))
    return 0


def _csv(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return values


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_evaluate_parser(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser(
        "evaluate", help="measure how far each saliency method can be trusted on the served models",
        description="Load the models in process as the server does and, for every applicable method: deletion and "
        "insertion against random and centred-Gaussian baseline maps, the model-randomisation sanity check "
        "(Adebayo et al. 2018) and, on the ground-truth benchmark's classifiers, localisation against exact object "
        "masks; print a markdown report.",
    )
    evaluate.add_argument("--config", help="evaluate the models of this configuration file on photos (default: the "
                          "server's default models)")
    evaluate.add_argument("--groundtruth-config", help="the ground-truth benchmark's models (default: "
                          "benchmarks/groundtruth/models.toml when it exists)")
    evaluate.add_argument("--models", type=_csv, help="comma-separated model ids to evaluate (default: all)")
    evaluate.add_argument("--methods", type=_csv, help="comma-separated methods (default: every registered method "
                          "that applies)")
    evaluate.add_argument("--images", type=_positive, help="photos per model (default 4)")
    evaluate.add_argument("--groundtruth-images", type=_positive, help="test samples per ground-truth model "
                          "(default 64)")
    evaluate.add_argument("--sanity-images", type=_positive, help="photos in the sanity check (default 2)")
    evaluate.add_argument("--groundtruth-sanity-images", type=_positive,
                          help="test samples in the sanity check (default 8)")
    evaluate.add_argument("--sanity-groups", type=_positive,
                          help="most block groups re-initialised in turn, besides the head and the stem (default 4)")
    evaluate.add_argument("--sanity-expensive", action="store_true",
                          help="sanity-check expensive methods (registry cost > 50) on large-input models too")
    evaluate.add_argument("--include-random", action="store_true",
                          help="evaluate models that run on random weights too (their numbers mean nothing)")
    evaluate.add_argument("--batch-size", type=_positive, help="images per explain batch (default 8)")
    evaluate.add_argument("--threads", type=_positive, help="torch CPU threads (default: torch's)")
    evaluate.add_argument("--seed", type=int, help="seed of the random baseline and the re-initialisation (default 0)")
    evaluate.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the config's)")
    evaluate.add_argument("--skip", type=lambda t: {s.strip() for s in t.split(",") if s.strip()}, default=set(),
                          help=f"comma-separated sections to leave out: {', '.join(SECTIONS)}")
    evaluate.add_argument("--smoke", action="store_true",
                          help="tiny random-weight models, 2 images, 3 methods: checks that everything runs")
    evaluate.add_argument("--output-json", help="write the full report as JSON here")
    evaluate.add_argument("--output-md", help="write the markdown report here (it is always printed)")
    evaluate.add_argument("--output-summary", help="write the per-method summary as the server ships it for "
                          "GET /v1/methods (service/explain/measured_quality.json): trained-weight models only")
    evaluate.set_defaults(handler=run_from_args)
