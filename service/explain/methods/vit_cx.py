"""ViT-CX (Xie et al. 2022, "ViT-CX: Causal Explanation of Vision Transformers"): masks from a layer's features,
scored by their causal impact on the target probability.

Each channel of the target layer's features (patch tokens reshaped to the grid, or a CNN feature map) is upsampled
bilinearly to the input size and min-max normalised to [0, 1]: one mask per channel. Near-duplicate masks are merged
by agglomerative clustering (complete linkage on cosine distance, clusters no wider than `distance_threshold`);
a cluster's mask is the min-max normalised mean of its members. Each mask M is scored with Gaussian noise e
(std `noise_std`) filling what it hides: s = p(x*M + e*(1-M)) - p(x + e*(1-M)) + p(x), where p is the target's
softmax probability (the second term removes the effect of the noise alone, as in the authors' code;
`noise_correction=false` gives s = p(x*M + e*(1-M))). The saliency is sum_M s*M / sum_M M: dividing by each pixel's
total mask coverage removes the bias towards pixels that many masks cover.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from service.explain.captures import CaptureBatch, CaptureNeeds
from service.model.anatomy import ModelAnatomy
from service.explain.methods._input import chunk_segments, normal_noise, seeded_generator
from service.explain.methods._cam import GradCamParams, check_target_layer, target_layer
from service.explain.registry import CostContext, CostEstimate, MethodCost, MethodOutput, register_method
from service.explain.methods._tokens import token_features_to_map


class VitCxParams(GradCamParams):
    distance_threshold: float = Field(
        default=0.1, ge=0.0, le=2.0,
        description="Masks are merged while every pair in a cluster has a cosine distance of at most this "
        "(0 merges only identical masks; larger values give fewer masks and fewer forward passes).",
    )
    noise_std: float = Field(
        default=0.1, ge=0.0, le=10.0,
        description="Standard deviation of the Gaussian noise filling the masked-out input (normalised input units).",
    )
    noise_correction: bool = Field(
        default=True, description="Subtract the effect of the noise alone: s = p(masked) - p(x + noise) + p(x)."
    )
    seed: int = Field(default=0, ge=0, le=2**63 - 1, description="Seed of the noise (one draw per mask, in order).")


def upsample(grids: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(n, h, w) -> (n, H, W), bilinear (half-pixel centres)."""
    return F.interpolate(grids[None], size=size, mode="bilinear", align_corners=False)[0]


def cluster_masks(
    features: torch.Tensor, size: tuple[int, int], threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image's features (C, h, w) -> the merged masks as (grids (K, h, w), lows (K,), highs (K,)).

    Mask k is (upsample(grids[k]) - lows[k]) / (highs[k] - lows[k]): upsampling is linear and keeps constants, so
    averaging the normalised masks on the grid and upsampling afterwards is exact, and only grids need keeping.
    """
    upsampled = upsample(features, size).flatten(1)  # (C, H*W)
    lows, highs = upsampled.amin(dim=1), upsampled.amax(dim=1)
    # A constant channel carries no spatial information. Decided on the grid: upsampling a constant leaves float
    # rounding noise whose range would be normalised up to a whole mask (and differ with the batch it came from).
    keep = _varies(features) & (highs > lows)
    if not bool(keep.any()):
        empty = features.new_zeros((0,))
        return features.new_zeros((0, *features.shape[1:])), empty, empty
    lows, highs, features = lows[keep], highs[keep], features[keep]
    masks = (upsampled[keep] - lows[:, None]) / (highs - lows)[:, None]
    unit = masks / masks.norm(dim=1, keepdim=True)
    distance = (1.0 - unit @ unit.T).double().clamp_min(0.0).cpu().numpy()
    del upsampled, masks, unit
    if len(distance) == 1:
        labels = np.ones(1, dtype=np.int64)
    else:
        distance = (distance + distance.T) / 2.0
        np.fill_diagonal(distance, 0.0)
        labels = fcluster(linkage(squareform(distance, checks=False), method="complete"), t=threshold,
                          criterion="distance")
    grids = (features - lows[:, None, None]) / (highs - lows)[:, None, None]
    _, first_member = np.unique(labels, return_index=True)
    clusters = [labels == labels[i] for i in sorted(first_member)]  # ordered by their first channel
    merged = torch.stack([grids[torch.from_numpy(members).to(grids.device)].mean(dim=0) for members in clusters])
    merged_up = upsample(merged, size).flatten(1)
    lows, highs = merged_up.amin(dim=1), merged_up.amax(dim=1)
    keep = _varies(merged) & (highs > lows)
    return merged[keep], lows[keep], highs[keep]


def _varies(grids: torch.Tensor) -> torch.Tensor:
    """(n, h, w) -> (n,) whether each grid holds more than one value."""
    flat = grids.flatten(1)
    return flat.amax(dim=1) > flat.amin(dim=1)


MASK_COST = 2.7  # forward passes' worth per mask and target with noise_correction (two inputs per mask), half without


def _cost(params: VitCxParams, ctx: CostContext) -> CostEstimate:
    """How many masks survive the merging is known only once the features are; before that the bound is one mask
    per channel of the target layer (a threshold of 0 merges only identical masks)."""
    layer = target_layer(params, ctx.anatomy)
    masks = ctx.layer_channels(layer)
    per_mask = MASK_COST if params.noise_correction else MASK_COST / 2
    return CostEstimate(per_mask * masks * ctx.targets,
                        f"{per_mask:g} x up to {masks} masks (the channels of {layer}) x {ctx.targets} target(s)")


@register_method(
    name="vit_cx",
    description="ViT-CX: each channel of a layer's features, upsampled and normalised, is a mask; near-duplicate "
    "masks are merged by clustering; each mask is scored by the target probability of the input kept under the mask "
    "and noise-filled elsewhere (minus the effect of the noise alone); saliency = score-weighted masks divided by "
    "each pixel's mask coverage. Same target layers as gradcam (default the last block's norm1); on a CNN feature "
    "map it is a causal CAM. Maps have the input resolution.",
    families=("vit", "cnn"),
    class_specific=True,
    params_model=VitCxParams,
    needs=lambda params, anatomy: CaptureNeeds(layers=frozenset({target_layer(params, anatomy)})),
    relative_cost=100.0,
    cost=MethodCost(_cost, f"{MASK_COST:g} ({MASK_COST / 2:g} without noise_correction) x masks x targets, masks "
                           "bounded by the target layer's channel count"),
    cost_note="About 2.7 forward passes' worth per merged mask and target (half that without noise_correction), so "
    "it depends on how many masks survive the merging: at most the layer's channel count (192 for ViT-Ti, 768 for "
    "ViT-B), fewer as distance_threshold grows (random-weight DeiT-Ti at 224: about 9 masks, 23 forward passes' "
    "worth, at the default 0.1; about 140 masks, 390, at 0.05). Masks of all images run through the model together "
    "in chunks of the model's explain_chunk_size.",
    check=check_target_layer,
)
def vit_cx(captures: CaptureBatch, params: VitCxParams, anatomy: ModelAnatomy) -> MethodOutput:
    runner, pixels, targets = captures.runner, captures.pixels, captures.targets
    assert runner is not None and targets is not None
    batch, size = pixels.shape[0], (pixels.shape[2], pixels.shape[3])
    features = token_features_to_map(captures.layers[target_layer(params, anatomy)], anatomy)
    clustered = [cluster_masks(features[i], size, params.distance_threshold) for i in range(batch)]
    probabilities = captures.logits.softmax(dim=-1).gather(1, targets[:, None].to(captures.logits.device))[:, 0]
    probabilities = probabilities.to(pixels.device)
    generators = [seeded_generator(params.seed, pixels.device) for _ in range(batch)]
    weighted = torch.zeros((batch, *size), device=pixels.device)
    coverage = torch.zeros((batch, *size), device=pixels.device)
    per_chunk = max(1, runner.chunk_size // 2) if params.noise_correction else runner.chunk_size
    for segments in chunk_segments([len(grids) for grids, _, _ in clustered], per_chunk):
        masks, kept, noisy = [], [], []
        for i, first, stop in segments:
            grids, lows, highs = clustered[i]
            m = (upsample(grids[first:stop], size) - lows[first:stop, None, None]) / \
                (highs - lows)[first:stop, None, None]
            m = m[:, None]  # (n, 1, H, W)
            noise = normal_noise(generators[i], stop - first, pixels.shape[1:], pixels.device) * params.noise_std
            masks.append(m)
            kept.append(pixels[i] * m + noise * (1 - m))
            if params.noise_correction:
                noisy.append(pixels[i] + noise * (1 - m))
        inputs = torch.cat(kept + noisy)
        chunk_targets = torch.cat([targets[i].repeat(stop - first) for i, first, stop in segments])
        logits = runner.logits(inputs).to(pixels.device)
        count = len(chunk_targets)
        p = logits.softmax(dim=-1)
        scores = p[:count].gather(1, chunk_targets[:, None])[:, 0]
        if params.noise_correction:
            scores = scores - p[count:].gather(1, chunk_targets[:, None])[:, 0]
        offset = 0
        for (i, first, stop), m in zip(segments, masks):
            s = scores[offset:offset + stop - first]
            if params.noise_correction:
                s = s + probabilities[i]
            weighted[i] += (s[:, None, None] * m[:, 0]).sum(dim=0)
            coverage[i] += m[:, 0].sum(dim=0)
            offset += stop - first
    saliency = torch.where(coverage > 0, weighted / coverage.clamp_min(1e-12), torch.zeros_like(weighted))
    return MethodOutput(maps=saliency)
