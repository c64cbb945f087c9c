"""The plain FastAPI peer: one `def` route per task, one request at a time through the model.

    python -m benchmarks.peers.plain --architecture deit_tiny_patch16_224 --data-config '{...}' --port 8001

/predict is one forward pass per request (what a FastAPI user writes first). The explanation routes are what a
TorchServe/Captum user gets: /explain/integrated_gradients is Captum's IntegratedGradients per request (the
server's default steps, integration and black baseline; channels summed); /explain/methods runs the reference
libraries one after another on the image: Captum Saliency (|gradient|, max over channels) and InputXGradient
(summed), pytorch-grad-cam's GradCAM and the per-image GAE loop of Chefer et al.'s notebook (ViTs), each map
returned at the input size. The hook-based references (pytorch-grad-cam, the GAE loop) register hooks on the shared
model, which would mix the activations of concurrent requests: that route holds a lock, as a correct handler must.
"""

from __future__ import annotations

import argparse
import copy
import threading
from typing import Any

import torch
import torch.nn.functional as F
import uvicorn
from captum.attr import InputXGradient, IntegratedGradients, Saliency
from fastapi import FastAPI
from pydantic import BaseModel

from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from benchmarks.peers._common import add_model_arguments, decode, load_model, raw_map, top_k
from benchmarks.references import PerImageGAE, vit_reshape_transform

class Body(BaseModel):
    image: str
    top_k: int = 5


def create_app(args: argparse.Namespace) -> FastAPI:
    model, transform = load_model(args)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    app = FastAPI()
    # The hook-based references need the attention probabilities (timm's fused kernel never forms them): a copy,
    # so /predict keeps the fused kernel.
    explain_model = copy.deepcopy(model)
    hooks_lock = threading.Lock()

    def pixels(body: Body) -> torch.Tensor:
        return transform(decode(body.image))[None].to(device, dtype)

    def classify(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(x).softmax(-1)[0]

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/predict")
    def predict(body: Body) -> dict[str, Any]:
        return {"predictions": top_k(classify(pixels(body)), body.top_k)}

    @app.post("/explain/integrated_gradients")
    def integrated_gradients(body: Body) -> dict[str, Any]:
        x = pixels(body)
        probabilities = classify(x)
        target = int(probabilities.argmax())
        mean = torch.tensor(args.mean, dtype=dtype, device=device).view(1, -1, 1, 1)
        std = torch.tensor(args.std, dtype=dtype, device=device).view(1, -1, 1, 1)
        black = ((0.0 - mean) / std).expand_as(x).contiguous()
        attributions = IntegratedGradients(model).attribute(
            x, baselines=black, target=target, n_steps=args.ig_steps, method=args.ig_method,
            internal_batch_size=args.chunk)
        return {"predictions": top_k(probabilities, body.top_k),
                "maps": {"integrated_gradients": raw_map(attributions[0].sum(0))}}

    @app.post("/explain/methods")
    def methods(body: Body) -> dict[str, Any]:
        x = pixels(body)
        probabilities = classify(x)
        target = int(probabilities.argmax())
        size = tuple(x.shape[-2:])
        maps = {
            "saliency": Saliency(model).attribute(x, target=target, abs=True)[0].amax(0),
            "input_x_gradient": InputXGradient(model).attribute(x, target=target)[0].sum(0),
        }
        with hooks_lock:
            maps["gradcam"] = torch.from_numpy(_gradcam(explain_model, x, target, args))
            if args.family == "vit":
                maps["gae"] = F.interpolate(_gae(explain_model, x, target, args)[None, None], size=size,
                                            mode="bilinear", align_corners=False)[0, 0]
        return {"predictions": top_k(probabilities, body.top_k),
                "maps": {name: raw_map(value) for name, value in maps.items()}}

    return app


def _gradcam(model: torch.nn.Module, x: torch.Tensor, target: int, args: argparse.Namespace) -> Any:
    reshape = vit_reshape_transform(args.prefix, tuple(args.grid)) if args.family == "vit" else None
    with GradCAM(model=model, target_layers=[model.get_submodule(args.feature_layer)],
                 reshape_transform=reshape) as cam:
        cam.compute_input_gradient = True  # the graph comes from the input: the parameters stay frozen
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(target)])[0]


def _gae(model: torch.nn.Module, x: torch.Tensor, target: int, args: argparse.Namespace) -> torch.Tensor:
    loop = PerImageGAE(model, args.prefix, tuple(args.grid))
    try:
        return loop(x, target)
    finally:
        loop.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--family", default="vit", choices=["vit", "cnn"])
    parser.add_argument("--feature-layer", default="blocks.-1.norm1", help="Grad-CAM's layer")
    parser.add_argument("--prefix", type=int, default=1, help="ViT prefix tokens (class, registers)")
    parser.add_argument("--grid", type=int, nargs=2, default=[14, 14], help="ViT token grid rows cols")
    parser.add_argument("--mean", type=float, nargs=3, default=[0.485, 0.456, 0.406])
    parser.add_argument("--std", type=float, nargs=3, default=[0.229, 0.224, 0.225])
    parser.add_argument("--ig-steps", type=int, default=32)
    parser.add_argument("--ig-method", default="gausslegendre")
    parser.add_argument("--chunk", type=int, default=32, help="IntegratedGradients' internal_batch_size")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    uvicorn.run(create_app(args), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
