"""Attention flow (Abnar & Zuidema 2020): maximum flow through the layered attention graph.

Nodes are (l, i) for l = 0..L and every token i; each block l adds edges (l, j) -> (l + 1, i) with capacity
A_l[i, j], A_l being the block's head-fused attention with the residual (0.5A + 0.5I, rows renormalised), as
in rollout. A patch's value is the maximum flow from (0, patch) to (L, class token), computed with scipy's Dinic
solver on integer capacities (A scaled by 1e6 and rounded). Edges into the top layer other than those into the
class token can never carry flow to the sink and are left out.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from pydantic import BaseModel, ConfigDict, Field
from scipy.sparse.csgraph import maximum_flow

from service.explain.captures import CaptureBatch, CaptureNeeds
from service.model.anatomy import ModelAnatomy
from service.explain.registry import CostContext, CostEstimate, MethodCost, MethodOutput, register_method
from service.explain.methods._rollout import rollout_matrix
from service.explain.methods._tokens import (
    HeadFusion,
    check_class_token_attention,
    patch_tokens_to_grid,
    token_count,
)

CAPACITY_SCALE = 1_000_000


class AttentionFlowParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    head_fusion: HeadFusion = Field(default="mean", description="How the heads are fused: mean, max or min.")
    discard_ratio: float = Field(
        default=0.5, ge=0.0, lt=1.0,
        description="Fraction of the entries of each fused (N, N) attention matrix removed from the graph before "
        "the residual is added: the int(ratio * N^2) lowest, ranked over the whole matrix, except those in "
        "prefix-token rows and columns (ranked, never removed). Fewer edges, faster flows: on a 2-core "
        "CPU deit-tiny at 224 takes about 2 s per image at 0 (the exact graph), 1 s at 0.5 and 0.25 s at 0.9.",
    )


def flow_graph(matrices: np.ndarray, sink_token: int = 0) -> sp.csr_matrix:
    """The layered graph of (L, N, N) per-block matrices as a CSR matrix of int32 capacities over (L + 1) * N
    nodes, node (l, i) being l * N + i."""
    layers, n, _ = matrices.shape
    rows, cols, capacities = [], [], []
    for layer, matrix in enumerate(matrices):
        scaled = np.rint(matrix * CAPACITY_SCALE)
        if layer == layers - 1:  # only the sink's in-edges matter in the top layer
            keep = np.zeros_like(scaled, dtype=bool)
            keep[sink_token] = True
            scaled = np.where(keep, scaled, 0.0)
        targets, sources = np.nonzero(scaled > 0)  # entry [i, j]: edge j -> i
        rows.append(layer * n + sources)
        cols.append((layer + 1) * n + targets)
        capacities.append(scaled[targets, sources].astype(np.int32))
    size = (layers + 1) * n
    return sp.csr_matrix(
        (np.concatenate(capacities), (np.concatenate(rows), np.concatenate(cols))), shape=(size, size)
    )


def patch_flows(matrices: np.ndarray, num_prefix_tokens: int) -> np.ndarray:
    """Maximum flow from every patch token at the bottom to the class token at the top, in attention units."""
    layers, n, _ = matrices.shape
    graph = flow_graph(matrices)
    sink = layers * n
    flows = [maximum_flow(graph, source, sink, method="dinic").flow_value for source in range(num_prefix_tokens, n)]
    return np.asarray(flows, dtype=np.float64) / CAPACITY_SCALE


def _check(params: AttentionFlowParams, anatomy: ModelAnatomy) -> None:
    check_class_token_attention(anatomy)


# Measured reference: deit-tiny at 224 (12 blocks of 197 tokens, 196 flows) costs about 60 of its forward passes at
# discard_ratio 0.5; the solver's work grows with depth x tokens^2 per flow, times the patches, and roughly with the
# share of edges kept (twice that at 0, a fifth at 0.9).
FLOW_REFERENCE_COST, FLOW_REFERENCE_WORK = 60.0, 12 * 197**2 * 196
CAPTURE_COST = 1.15  # the recording forward pass alone


def _cost(params: AttentionFlowParams, ctx: CostContext) -> CostEstimate:
    anatomy = ctx.anatomy
    tokens = token_count(anatomy)
    patches = max(1, tokens - anatomy.num_prefix_tokens)
    work = anatomy.num_layers * tokens**2 * patches / FLOW_REFERENCE_WORK
    # The share of edges kept shrinks the solver's work, but never below a fifth: the graph, the rollout tensors and
    # one max-flow per patch remain whatever is discarded (no discard_ratio near 1 makes a large ViT cheap).
    edges = max(0.2, 2 * (1 - params.discard_ratio))
    units = max(CAPTURE_COST, FLOW_REFERENCE_COST * work * edges)
    return CostEstimate(units, f"{FLOW_REFERENCE_COST:g} x depth {anatomy.num_layers} x {tokens} tokens^2 x {patches} "
                               f"patches / deit-tiny's x max(0.2, 2(1 - discard_ratio={params.discard_ratio:g}))")


@register_method(
    name="attention_flow",
    description="Attention flow (Abnar & Zuidema 2020): each patch's maximum flow to the class token through the "
    "layered graph of residual-adjusted, head-fused attention (capacities scaled by 1e6 and rounded to integers "
    "for scipy's Dinic max-flow solver; one max-flow per patch, per image, on the CPU).",
    families=("vit",),
    class_specific=False,
    params_model=AttentionFlowParams,
    needs=lambda params, anatomy: CaptureNeeds(attention=True),
    relative_cost=60.0,
    cost=MethodCost(_cost, "60 x (depth x tokens^2 x patches, relative to deit-tiny at 224) x 2(1 - discard_ratio), "
                           "at least 1.15"),
    cost_note="CPU-bound and sequential, whatever the device: one max-flow per patch token and image. deit-tiny "
    "at 224 (196 flows per image over 12 layers of 197 tokens) on a 2-core CPU: about 1 s per image at the default "
    "discard_ratio 0.5, 2 s at 0 (the exact graph) and 0.25 s at 0.9; the cost grows with depth x tokens^2 per "
    "flow, times the number of patches.",
    check=_check,
)
def attention_flow(captures: CaptureBatch, params: AttentionFlowParams, anatomy: ModelAnatomy) -> MethodOutput:
    matrices = torch.stack([
        rollout_matrix(attention, params.head_fusion, params.discard_ratio, anatomy.num_prefix_tokens)
        for attention in captures.attentions
    ], dim=1).double().cpu().numpy()  # (B, L, N, N)
    per_image = []
    for image in matrices:  # about a second each: stop between images when nobody waits any more
        if captures.runner is not None:
            captures.runner.checkpoint()
        per_image.append(patch_flows(image, anatomy.num_prefix_tokens))
    flows = np.stack(per_image)
    device = captures.attentions[0].device
    return MethodOutput(maps=patch_tokens_to_grid(torch.from_numpy(flows).float().to(device), anatomy))
