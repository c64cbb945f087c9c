"""Grad-CAM against pytorch-grad-cam on a CNN and on ViTs (with its reshape transform)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM

from benchmarks.references import pytorch_grad_cam_maps, pytorch_grad_cam_scale
from service.explain.targets import TargetRequest
from tests.explain_helpers import VIT_VARIANTS, explain_direct, random_pixels, served_model

CNN = ("test_resnet", {"num_classes": 10})


def reference_gradcam(served, pixels: torch.Tensor, targets: list[int], layer_name: str) -> np.ndarray:
    return pytorch_grad_cam_maps(served, GradCAM, pixels.clone(), targets, layer_name)


@pytest.mark.parametrize("model_key", ["cnn", "vit", "deit_distilled", "registers_nonsquare"])
def test_gradcam_matches_pytorch_grad_cam(model_key: str) -> None:
    architecture, kwargs = CNN if model_key == "cnn" else VIT_VARIANTS[model_key]
    if model_key == "cnn":
        kwargs = dict(kwargs)
    served = served_model(architecture, kwargs, seed=5)
    if model_key == "cnn":
        assert served.anatomy.feature_layer == "layer4"
    else:
        assert served.anatomy.feature_layer == f"blocks.{len(served.active_network.blocks) - 1}.norm1"
    pixels = random_pixels(served, 3, seed=3)
    targets = [1, 7, 4]
    outcomes = explain_direct(served, pixels, ["gradcam"],
                              targets=[TargetRequest(index=t) for t in targets])
    ours = torch.stack([o.methods[0].maps[0] for o in outcomes])
    assert (ours >= 0).all()
    height, width = served.input_size[1:]
    reference = reference_gradcam(served, pixels, targets, served.anatomy.feature_layer)
    np.testing.assert_allclose(pytorch_grad_cam_scale(ours, (height, width)).numpy(), reference, atol=1e-4)


def test_gradcam_target_layer_override_and_per_target_maps() -> None:
    served = served_model(*CNN, seed=2)
    pixels = random_pixels(served, 2, seed=8)
    outcomes = explain_direct(served, pixels, [{"name": "gradcam", "params": {"target_layer": "layer3"}}],
                              target=TargetRequest(top_k=3))
    for i, outcome in enumerate(outcomes):
        assert len(outcome.targets) == 3 and len(outcome.methods[0].maps) == 3
        reference = reference_gradcam(served, pixels[i:i + 1].repeat(3, 1, 1, 1), outcome.targets, "layer3")
        ours = torch.stack(outcome.methods[0].maps)
        np.testing.assert_allclose(pytorch_grad_cam_scale(ours, served.input_size[1:]).numpy(), reference, atol=1e-4)
        assert not torch.allclose(ours[0], ours[1])  # different classes, different maps


def test_gradcam_batched_with_mixed_targets_equals_per_image() -> None:
    served = served_model(*VIT_VARIANTS["vit"], seed=9)
    pixels = random_pixels(served, 3, seed=6)
    targets = [TargetRequest(index=2), TargetRequest(top_k=2), TargetRequest(top_k=1)]
    batched = explain_direct(served, pixels, ["gradcam", "rollout"], targets=targets)
    for i in range(3):
        single = explain_direct(served, pixels[i:i + 1], ["gradcam", "rollout"], targets=[targets[i]])[0]
        assert batched[i].targets == single.targets
        for ours, theirs in zip(batched[i].methods[0].maps, single.methods[0].maps):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(batched[i].methods[1].maps[0], single.methods[1].maps[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(batched[i].probabilities, single.probabilities, atol=1e-6, rtol=1e-5)
