"""CAM (Zhou et al. 2016): for a head that averages the final features and applies one linear layer, the target
class's classifier weights times the final features at each position."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict

from service.explain.captures import CaptureBatch, CaptureNeeds
from service.model.anatomy import ModelAnatomy
from service.explain.registry import MethodOutput, register_method
from service.explain.methods._tokens import token_features_to_map


class CamParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check(params: CamParams, anatomy: ModelAnatomy) -> None:
    if anatomy.pooled_linear_head is None:
        raise ValueError(
            "CAM needs a head that averages the final features and applies one linear layer (global average pooling "
            f"CNNs, average-pooled ViTs); this model does not qualify: {anatomy.head_note or 'unknown head'}"
        )


def _needs(params: CamParams, anatomy: ModelAnatomy) -> CaptureNeeds:
    _check(params, anatomy)
    assert anatomy.pooled_linear_head is not None
    return CaptureNeeds(layers=frozenset({anatomy.pooled_linear_head.features}))


@register_method(
    name="cam",
    description="CAM: the target class's classifier weights times the final features at each position (feature-map "
    "cell or patch token), unrectified; the map's mean plus the bias is the target logit. Only for models whose "
    "head averages the final features and applies one linear layer (ResNets, EfficientNets, average-pooled ViTs). "
    "A LayerNorm between pooling and classifier (fc_norm of average-pooled ViTs, ConvNeXt) is handled exactly: "
    "token features are centred over channels, weighted by the classifier weights times the norm's scale, and "
    "divided by the pooled vector's standard deviation, so the map's mean plus a constant is still the logit.",
    families=("vit", "cnn"),
    class_specific=True,
    params_model=CamParams,
    needs=_needs,
    relative_cost=1.05,
    check=_check,
)
def cam(captures: CaptureBatch, params: CamParams, anatomy: ModelAnatomy) -> MethodOutput:
    head, runner, targets = anatomy.pooled_linear_head, captures.runner, captures.targets
    assert head is not None and runner is not None and targets is not None
    features = token_features_to_map(captures.layers[head.features], anatomy)  # (B, C, h, w)
    weights = runner.module.get_submodule(head.classifier).weight.detach().float()
    class_weights = weights.index_select(0, targets.to(weights.device)).to(features.device)  # (B, C)
    if head.norm is None:
        return MethodOutput(maps=torch.einsum("bc,bchw->bhw", class_weights, features))
    norm = runner.module.get_submodule(head.norm)
    if norm.weight is not None:
        class_weights = class_weights * norm.weight.detach().float().to(features.device)
    pooled = features.mean(dim=(2, 3))
    scale = torch.sqrt(pooled.var(dim=1, unbiased=False) + norm.eps)  # LayerNorm's divisor of the pooled vector
    centred = features - features.mean(dim=1, keepdim=True)
    return MethodOutput(maps=torch.einsum("bc,bchw->bhw", class_weights, centred) / scale[:, None, None])
