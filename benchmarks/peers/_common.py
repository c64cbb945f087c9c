"""What both peers share: the model and transform from the server's description, decoding, the answer's shape."""

from __future__ import annotations

import argparse
import base64
import io
import json
from typing import Any

import numpy as np
import torch
from PIL import Image


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--architecture", required=True, help="timm architecture (random weights)")
    parser.add_argument("--model-kwargs", default="{}", help="JSON keyword arguments of timm.create_model")
    parser.add_argument("--data-config", required=True,
                        help="JSON of the served model's timm data config (input_size, interpolation, crop_pct, ...)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)


def load_model(args: argparse.Namespace) -> tuple[torch.nn.Module, Any]:
    """The architecture with random weights in eval mode, and timm's eval transform of the served data config."""
    import timm
    from timm.data import create_transform

    torch.manual_seed(0)
    model = timm.create_model(args.architecture, pretrained=False, **json.loads(args.model_kwargs))
    model = model.eval().to(args.device, getattr(torch, args.dtype))
    model.requires_grad_(False)  # inference: no parameter gradients (a peer's explanations turn them on if needed)
    transform = create_transform(**json.loads(args.data_config), is_training=False)
    return model, transform


def decode(image_base64: str) -> Image.Image:
    """Pillow's decode of the base64 upload, as RGB."""
    return Image.open(io.BytesIO(base64.b64decode(image_base64))).convert("RGB")


def top_k(probabilities: torch.Tensor, k: int) -> list[dict[str, float | int]]:
    values, indices = probabilities.float().topk(min(k, probabilities.numel()))
    return [{"index": int(i), "probability": float(v)} for v, i in zip(values.tolist(), indices.tolist())]


def raw_map(values: torch.Tensor) -> dict[str, Any]:
    """A map as the server's `raw` output carries it: shape and base64 of little-endian float32."""
    array = np.ascontiguousarray(values.detach().float().cpu().numpy(), dtype="<f4")
    return {"shape": list(array.shape), "data": base64.b64encode(array.tobytes()).decode("ascii")}
