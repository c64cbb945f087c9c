"""Whether a model's head is "average-pool the final features, optionally LayerNorm, then one linear layer".

Class activation mapping (CAM, Zhou et al. 2016) needs exactly that head. Rather than trusting attribute names, the
structure is verified numerically once at load time: on a random input, the classifier's input must equal the
average of the final features over their positions (patch tokens for ViTs: prefix tokens excluded), directly or
through one LayerNorm, and the logits must be the classifier's output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class PooledLinearHead:
    """logits = classifier(norm(mean over positions of the output of `features`)), norm optional."""

    features: str  # module whose output is the final feature map (B, C, h, w) or token sequence (B, N, C)
    classifier: str  # an nn.Linear
    norm: str | None = None  # an nn.LayerNorm over channels applied to the pooled vector (ViT fc_norm, ...)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        return False
    loose = a.dtype in (torch.float16, torch.bfloat16)
    scale = max(1.0, float(b.abs().max()))
    return bool(torch.allclose(a, b, rtol=1e-2 if loose else 1e-4, atol=(1e-2 if loose else 1e-5) * scale))


def trace_final_features(model: nn.Module, x: torch.Tensor) -> tuple[object, str | None]:
    """Run `model.forward_features(x)` in inference mode, recording every module's output: returns (the final
    features, the outermost module whose output they are, or None when no module's output is them)."""
    outputs: dict[str, object] = {}  # the outputs themselves: ids of freed tensors get reused
    handles = [
        module.register_forward_hook(lambda _m, _i, out, name=name: outputs.__setitem__(name, out))
        for name, module in model.named_modules() if name
    ]
    try:
        with torch.inference_mode():
            features = model.forward_features(x)
    finally:
        for handle in handles:
            handle.remove()
    candidates = [name for name, out in outputs.items() if out is features]
    return features, min(candidates, key=lambda name: name.count(".")) if candidates else None


def analyse_pooled_linear_head(
    model: nn.Module, input_size: tuple[int, int, int], num_prefix_tokens: int
) -> tuple[PooledLinearHead | None, str | None]:
    """(the head, None) when it is a pooled linear head, else (None, why not)."""
    get_classifier = getattr(model, "get_classifier", None)
    classifier = get_classifier() if callable(get_classifier) else None
    if not isinstance(classifier, nn.Linear):
        return None, "its classifier is not a single linear layer"
    if not (callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None))):
        return None, "it does not separate forward_features and forward_head"
    names = {id(module): name for name, module in model.named_modules() if name}
    norm_io: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    classifier_io: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record_norm(name: str):
        return lambda _m, args, out: norm_io.__setitem__(name, (args[0], out))

    param = next(model.parameters())
    x = torch.randn((1, *input_size), generator=torch.Generator().manual_seed(0)).to(param.device, param.dtype)
    features, producer = trace_final_features(model, x)
    handles = [module.register_forward_hook(record_norm(name)) for name, module in model.named_modules()
               if isinstance(module, nn.LayerNorm)]
    handles.append(classifier.register_forward_hook(lambda _m, args, out: classifier_io.append((args[0], out))))
    try:
        with torch.inference_mode():
            logits = model.forward_head(features)
    finally:
        for handle in handles:
            handle.remove()

    if producer is None or not isinstance(features, torch.Tensor):
        return None, "no module outputs its final features"
    if len(classifier_io) != 1 or not _close(classifier_io[0][1], logits):
        return None, "its logits are not the output of its classifier alone (e.g. several heads are combined)"
    if features.ndim == 4:
        pooled = features.float().mean(dim=(2, 3))
    elif features.ndim == 3:
        pooled = features[:, num_prefix_tokens:].float().mean(dim=1)
    else:
        return None, f"its final features have an unexpected shape {tuple(features.shape)}"
    classifier_input = classifier_io[0][0].flatten(1)
    head = dict(features=producer, classifier=names[id(classifier)])
    if _close(classifier_input, pooled):
        return PooledLinearHead(**head), None
    for name, (norm_input, norm_output) in norm_io.items():
        module = model.get_submodule(name)
        if (len(module.normalized_shape) == 1 and _close(norm_input.flatten(1), pooled)
                and _close(norm_output.flatten(1), classifier_input)):
            return PooledLinearHead(**head, norm=name), None
    return None, ("its classifier does not read the average of its final features (class-token, attention or max "
                  "pooling, or layers between the pooling and the classifier)")
