"""Grad-CAM++ and LayerCAM against pytorch-grad-cam; CAM against an explicit weights-times-features computation
(and the logits it decomposes); batched equals per-image; per-target maps; CAM rejected where it does not apply."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAMPlusPlus, LayerCAM

from api_schemas import MethodSpec
from benchmarks.references import pytorch_grad_cam_maps, pytorch_grad_cam_scale
from service.explain.requests import MethodRequestError, resolve_methods
from service.explain.targets import TargetRequest
from tests.explain_helpers import TINY, VIT_VARIANTS, explain_direct, random_pixels, served_model, stack_maps

CNN = ("test_resnet", {"num_classes": 10})
AVG_VIT = ("vit_tiny_patch16_224", dict(VIT_VARIANTS["vit"][1], global_pool="avg"))  # class token kept, fc_norm
AVG_VIT_NO_CLS = ("vit_tiny_patch16_224", dict(VIT_VARIANTS["vit"][1], global_pool="avg", class_token=False))
AVG_VIT_NO_FC_NORM = ("vit_tiny_patch16_224", dict(VIT_VARIANTS["vit"][1], global_pool="avg", fc_norm=False))
AVG_REGISTERS = ("vit_small_patch16_224", dict(TINY, img_size=(32, 48), patch_size=8, reg_tokens=4,
                                               global_pool="avg"))


def model_for(key: str, seed: int = 0):
    if key == "cnn":
        return served_model(*CNN, size=48, seed=seed)
    return served_model(*VIT_VARIANTS[key], seed=seed)


@pytest.mark.parametrize("method,cam_class", [("gradcam_pp", GradCAMPlusPlus), ("layercam", LayerCAM)])
@pytest.mark.parametrize("model_key", ["cnn", "vit", "deit_distilled", "registers_nonsquare"])
def test_matches_pytorch_grad_cam(method, cam_class, model_key) -> None:
    served = model_for(model_key, seed=5)
    pixels = random_pixels(served, 3, seed=3)
    targets = [1, 7, 4]
    outcomes = explain_direct(served, pixels, [method], targets=[TargetRequest(index=t) for t in targets])
    ours = stack_maps(outcomes)
    assert (ours >= 0).all() and ours.amax() > 0
    reference = pytorch_grad_cam_maps(served, cam_class, pixels.clone(), targets, served.anatomy.feature_layer)
    np.testing.assert_allclose(pytorch_grad_cam_scale(ours, served.input_size[1:]).numpy(), reference, atol=1e-4)


@pytest.mark.parametrize("method,cam_class", [("gradcam_pp", GradCAMPlusPlus), ("layercam", LayerCAM)])
def test_target_layer_override(method, cam_class) -> None:
    served = model_for("cnn", seed=2)
    pixels = random_pixels(served, 2, seed=8)
    targets = [3, 5]
    outcomes = explain_direct(served, pixels, [{"name": method, "params": {"target_layer": "layer3"}}],
                              targets=[TargetRequest(index=t) for t in targets])
    reference = pytorch_grad_cam_maps(served, cam_class, pixels.clone(), targets, "layer3")
    np.testing.assert_allclose(pytorch_grad_cam_scale(stack_maps(outcomes), served.input_size[1:]).numpy(), reference,
                               atol=1e-4)
    with pytest.raises(MethodRequestError):
        resolve_methods([MethodSpec(name=method, params={"target_layer": "nope"})], served.family, served.anatomy)


def explicit_cam(served, pixels: torch.Tensor, targets: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights times features written out from timm's own pieces; also the logits of the targets."""
    model = served.active_network
    with torch.no_grad():
        features = model.forward_features(pixels)
        logits = model(pixels).gather(1, torch.tensor(targets)[:, None])[:, 0]
    head = model.get_classifier()
    weights = head.weight[targets]  # (B, C)
    if features.ndim == 3:  # ViT: patch tokens (B, rows * cols, C) -> (B, C, rows, cols)
        rows, cols = served.anatomy.grid_size
        features = features[:, model.num_prefix_tokens:].transpose(1, 2).reshape(len(targets), -1, rows, cols)
    fc_norm = getattr(model, "fc_norm", None)
    if isinstance(fc_norm, torch.nn.LayerNorm):
        # LayerNorm(mean of tokens) = gamma * (mean - mean over channels) / sigma + beta: linear in the tokens once
        # sigma (of the pooled vector) is fixed
        pooled = features.mean(dim=(2, 3))
        sigma = torch.sqrt(pooled.var(dim=1, unbiased=False) + fc_norm.eps)
        features = (features - features.mean(dim=1, keepdim=True)) / sigma[:, None, None, None]
        weights = weights * fc_norm.weight
    maps = torch.einsum("bc,bchw->bhw", weights, features)
    return maps, logits


@pytest.mark.parametrize("model", ["cnn", "efficientnet", "avg_vit", "avg_vit_no_cls", "avg_vit_no_fc_norm",
                                   "avg_registers"])
def test_cam_matches_weights_times_features(model) -> None:
    served = {
        "cnn": lambda: served_model(*CNN, size=48, seed=3),
        "efficientnet": lambda: served_model("test_efficientnet", {"num_classes": 10}, size=48, seed=3),
        "avg_vit": lambda: served_model(*AVG_VIT, seed=3),
        "avg_vit_no_cls": lambda: served_model(*AVG_VIT_NO_CLS, seed=3),
        "avg_vit_no_fc_norm": lambda: served_model(*AVG_VIT_NO_FC_NORM, seed=3),
        "avg_registers": lambda: served_model(*AVG_REGISTERS, seed=3),
    }[model]()
    pixels = random_pixels(served, 3, seed=4)
    targets = [2, 9, 5]
    outcomes = explain_direct(served, pixels, ["cam"], targets=[TargetRequest(index=t) for t in targets])
    ours = stack_maps(outcomes)
    expected, logits = explicit_cam(served, pixels, targets)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
    # CAM decomposes the logit: map mean + a per-class constant (bias, and the norm's shift) = logit
    model_ = served.active_network
    head = model_.get_classifier()
    constant = head.bias[targets]
    fc_norm = getattr(model_, "fc_norm", None)
    if isinstance(fc_norm, torch.nn.LayerNorm):
        constant = constant + head.weight[targets] @ fc_norm.bias
    torch.testing.assert_close(ours.mean(dim=(1, 2)) + constant, logits, atol=1e-5, rtol=1e-4)
    if served.family == "vit":
        assert ours.shape[1:] == served.anatomy.grid_size


@pytest.mark.parametrize("key", ["vit", "deit_distilled"])
def test_cam_is_rejected_for_class_token_models(key) -> None:
    served = served_model(*VIT_VARIANTS[key])
    assert served.anatomy.pooled_linear_head is None
    with pytest.raises(MethodRequestError) as info:
        resolve_methods(["cam"], served.family, served.anatomy)
    assert "CAM needs" in str(info.value)


def test_cam_is_rejected_for_layers_between_pooling_and_classifier() -> None:
    served = served_model("mobilenetv3_small_050", {"num_classes": 10})
    assert served.anatomy.pooled_linear_head is None and "does not read the average" in served.anatomy.head_note
    with pytest.raises(MethodRequestError):
        resolve_methods(["cam"], served.family, served.anatomy)


@pytest.mark.parametrize("model_key", ["cnn", "avg_vit"])
def test_batched_equals_per_image_and_targets_differ(model_key) -> None:
    served = served_model(*CNN, size=48, seed=9) if model_key == "cnn" else served_model(*AVG_VIT, seed=9)
    methods = ["cam", "gradcam_pp", "layercam"]
    pixels = random_pixels(served, 3, seed=6)
    targets = [TargetRequest(index=2), TargetRequest(top_k=2), TargetRequest(top_k=1)]
    batched = explain_direct(served, pixels, methods, targets=targets)
    for i in range(3):
        single = explain_direct(served, pixels[i:i + 1], methods, targets=[targets[i]])[0]
        assert batched[i].targets == single.targets
        for ours, theirs in zip(batched[i].methods, single.methods):
            for a, b in zip(ours.maps, theirs.maps):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    for method in batched[1].methods:  # top 2: two classes, two different maps
        first, second = method.maps
        assert not torch.allclose(first / first.abs().max(), second / second.abs().max())
