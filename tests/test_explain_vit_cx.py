"""ViT-CX against a naive per-mask loop (scikit-learn's clustering, one forward pass per masked image, as in the
authors' code); batched equals per-image whatever the chunk size; per-target maps; CNN feature maps too."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.cluster import AgglomerativeClustering

from service.explain.methods.vit_cx import cluster_masks
from service.explain.targets import TargetRequest
from tests.explain_helpers import VIT_VARIANTS, RecordRunnerCalls, explain_direct, random_pixels, served_model, stack_maps

CNN = ("test_resnet", {"num_classes": 10})


def layer_features(served, pixels: torch.Tensor, layer: str) -> torch.Tensor:
    """The layer's output for the batch as (B, C, h, w), patch tokens reshaped to the grid."""
    captured = []
    handle = served.active_network.get_submodule(layer).register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with torch.no_grad():
            served.active_network(pixels)
    finally:
        handle.remove()
    out = captured[0]
    if out.ndim == 3:
        rows, cols = served.anatomy.grid_size
        out = out[:, served.anatomy.num_prefix_tokens:].transpose(1, 2).reshape(out.shape[0], -1, rows, cols)
    return out


def normalise(mask: torch.Tensor) -> torch.Tensor:
    return (mask - mask.min()) / (mask.max() - mask.min())


def naive_vit_cx(served, image: torch.Tensor, features: torch.Tensor, target: int, threshold: float,
                 noise_std: float, seed: int, correction: bool) -> tuple[torch.Tensor, int]:
    """One image, written out plainly: returns (saliency (H, W), number of merged masks)."""
    height, width = image.shape[1:]
    upsampled = F.interpolate(features[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    masks = [normalise(channel) for channel in upsampled if channel.max() > channel.min()]
    flat = torch.stack([m.flatten() for m in masks])
    similarity = (flat @ flat.T) / (flat.norm(dim=1)[:, None] * flat.norm(dim=1)[None, :])
    labels = AgglomerativeClustering(n_clusters=None, distance_threshold=threshold, metric="precomputed",
                                     linkage="complete").fit((1 - similarity).clamp_min(0).double().numpy()).labels_
    order = []
    for label in labels:  # clusters in the order of their first mask
        if label not in order:
            order.append(label)
    merged = []
    for label in order:
        total = sum(masks[i] for i in range(len(masks)) if labels[i] == label)
        if total.max() > total.min():
            merged.append(normalise(total))

    def probability(x: torch.Tensor) -> float:
        with torch.no_grad():
            return float(served.active_network(x[None]).softmax(-1)[0, target])

    p_x = probability(image)
    generator = torch.Generator().manual_seed(seed)
    weighted = torch.zeros(height, width)
    coverage = torch.zeros(height, width)
    for mask in merged:
        noise = torch.randn(image.shape, generator=generator) * noise_std
        score = probability(image * mask + noise * (1 - mask))
        if correction:
            score = score - probability(image + noise * (1 - mask)) + p_x
        weighted += score * mask
        coverage += mask
    return weighted / coverage, len(merged)


@pytest.mark.parametrize("model_key,params", [
    ("vit", {}),
    ("vit", {"distance_threshold": 0.25, "noise_correction": False, "noise_std": 0.3, "seed": 5}),
    ("deit_distilled", {"target_layer": "blocks.1.norm1", "distance_threshold": 0.05}),
    ("cnn", {"distance_threshold": 0.2}),
])
def test_vit_cx_matches_a_naive_per_mask_loop(model_key, params) -> None:
    served = served_model(*CNN, size=64, seed=2) if model_key == "cnn" else served_model(*VIT_VARIANTS[model_key],
                                                                                         seed=2)
    pixels = random_pixels(served, 2, seed=4)
    targets = [3, 8]
    outcomes = explain_direct(served, pixels, [{"name": "vit_cx", "params": params}],
                               targets=[TargetRequest(index=t) for t in targets], chunk_size=7)
    ours = stack_maps(outcomes)
    assert ours.shape == (2, *served.input_size[1:])
    layer = params.get("target_layer", served.anatomy.feature_layer)
    features = layer_features(served, pixels, layer)
    for i, target in enumerate(targets):
        expected, merged = naive_vit_cx(
            served, pixels[i], features[i], target, params.get("distance_threshold", 0.1),
            params.get("noise_std", 0.1), params.get("seed", 0), params.get("noise_correction", True),
        )
        assert 1 < merged < features.shape[1]  # the clustering merged some masks, not all
        torch.testing.assert_close(ours[i], expected, atol=1e-5, rtol=1e-4)


def test_vit_cx_batched_equals_per_image_and_passes_stay_chunked(monkeypatch) -> None:
    served = served_model(*VIT_VARIANTS["registers_nonsquare"], seed=3)
    pixels = random_pixels(served, 3, seed=5)
    targets = [TargetRequest(index=2), TargetRequest(top_k=2), TargetRequest(top_k=1)]
    calls = RecordRunnerCalls(monkeypatch)
    batched = explain_direct(served, pixels, ["vit_cx"], targets=targets, chunk_size=10)
    assert max(calls.sizes) <= 10 and calls.sizes.count(10) > 3  # masks of different images share passes
    for i in range(3):
        single = explain_direct(served, pixels[i:i + 1], ["vit_cx"], targets=[targets[i]], chunk_size=3)[0]
        assert batched[i].targets == single.targets
        for a, b in zip(batched[i].methods[0].maps, single.methods[0].maps):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    maps = batched[1].methods[0].maps  # top 2: two classes, two different maps
    assert len(maps) == 2 and not torch.allclose(maps[0] - maps[0].mean(), maps[1] - maps[1].mean())


def test_constant_feature_channels_make_no_masks_so_a_batch_equals_its_images() -> None:
    """A 1 x 1 feature map (test_resnet at 32 px) has only constant channels: upsampling leaves rounding noise that
    must not become masks (it differed between a batch and its images)."""
    served = served_model("test_resnet", {"num_classes": 10}, size=32, seed=2)
    pixels = random_pixels(served, 3, seed=4)
    targets = [TargetRequest(index=t) for t in (1, 4, 7)]
    batched = explain_direct(served, pixels, ["vit_cx"], targets=targets)
    for i in range(3):
        single = explain_direct(served, pixels[i:i + 1], ["vit_cx"], targets=[targets[i]])[0]
        torch.testing.assert_close(batched[i].methods[0].maps[0], single.methods[0].maps[0], atol=1e-5, rtol=1e-4)
    grid = cluster_masks(torch.full((4, 1, 1), 0.3), (32, 32), threshold=0.1)[0]
    assert grid.shape[0] == 0
