"""The LitServe peer, tuned like the server: one inference worker per lane, each batch at most the server's batch
cap per lane, the server's batch wait, torch's threads split between the workers.

    python -m benchmarks.peers.litserve_peer --architecture deit_tiny_patch16_224 --data-config '{...}' \\
        --port 8002 --workers 2 --max-batch-size 16 --batch-timeout-ms 5 --threads 1

The stages are LitServe's own: decode_request (Pillow and timm's transform, in the worker), batch (stack), predict
(one forward pass), unbatch, encode_response (the top k).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from benchmarks.peers._common import add_model_arguments, decode, load_model, top_k


try:
    import litserve as ls
except ImportError:  # the bench reports the peer as unavailable; this module is only run when it is installed
    ls = None


class Classifier(ls.LitAPI if ls is not None else object):  # type: ignore[misc]
    """The classifier in LitServe's stages. Module-level and configured by attributes, so the workers it spawns
    can unpickle it."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout_ms / 1000.0)
        self.args = args

    def setup(self, device: str) -> None:
        if self.args.threads:
            torch.set_num_threads(self.args.threads)
        self.model, self.transform = load_model(self.args)
        self.dtype = getattr(torch, self.args.dtype)

    def decode_request(self, request):  # type: ignore[no-untyped-def] - unannotated: LitServe passes the JSON body
        return self.transform(decode(request["image"])), int(request.get("top_k", 5))

    def batch(self, inputs: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, list[int]]:
        return torch.stack([x for x, _ in inputs]), [k for _, k in inputs]

    def predict(self, batch: tuple[torch.Tensor, list[int]]) -> tuple[torch.Tensor, list[int]]:
        x, ks = batch
        with torch.inference_mode():
            return self.model(x.to(self.args.device, self.dtype)).softmax(-1).float().cpu(), ks

    def unbatch(self, output: tuple[torch.Tensor, list[int]]) -> list[tuple[torch.Tensor, int]]:
        probabilities, ks = output
        return list(zip(probabilities, ks))

    def encode_response(self, output: tuple[torch.Tensor, int]) -> dict[str, Any]:
        probabilities, k = output
        return {"predictions": top_k(probabilities, k)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--workers", type=int, default=1, help="inference worker processes")
    parser.add_argument("--max-batch-size", type=int, default=1)
    parser.add_argument("--batch-timeout-ms", type=float, default=0.0)
    parser.add_argument("--threads", type=int, help="torch threads per worker (default: torch's)")
    args = parser.parse_args(argv)
    if ls is None:
        raise SystemExit("litserve is not installed (pip install -e '.[bench]')")
    accelerator = "cuda" if args.device.startswith("cuda") else "cpu"
    server = ls.LitServer(Classifier(args), accelerator=accelerator, devices=1, workers_per_device=args.workers)
    server.run(host=args.host, port=args.port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
