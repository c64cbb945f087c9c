"""Value zeroing (Mohebbi et al. 2023): how much each token's value vectors change every token's block output.

For a block and each token j, the block is run again on its recorded input with j's value vectors zeroed in
every head (a hook on the attention's qkv projection zeroes j's slice of v; queries, keys and hence the attention
probabilities are untouched). The contribution of j to i is the cosine distance between token i's original and
altered block outputs (computed as ||u - u'||^2 / 2 of the unit vectors, which keeps its precision when the
outputs are nearly parallel; blocks of half-precision models are recomputed in float32). Each row is normalised
to sum to 1; blocks are aggregated with the rollout product (no extra residual term: the block outputs already
include the residual stream).
"""

from __future__ import annotations

import copy
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from service.explain.captures import CaptureBatch, CaptureNeeds
from service.model.anatomy import ModelAnatomy
from service.explain.registry import CostContext, CostEstimate, MethodCost, MethodOutput, register_method
from service.explain.methods._rollout import class_token_row, normalise_rows
from service.explain.methods._tokens import (
    aggregated_layers,
    token_count,
    check_class_token_attention,
    check_layer_index,
    patch_tokens_to_grid,
)

DEFAULT_CHUNK = 32


class ValueZeroingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    layer: int = Field(
        default=-1,
        description="The top block: with `aggregate=last` the map is this block's value-zeroing row, with "
        "`rollout` the product runs from the first block up to this one. Negative values count from the last.",
    )
    aggregate: Literal["last", "rollout"] = Field(
        default="last",
        description="`last`: the class token's row of block `layer` (one block recomputed N times); `rollout`: the "
        "product of the row-normalised matrices of blocks 0..layer (every one of those blocks recomputed N times).",
    )


def block_name(attention_module: str) -> str:
    return attention_module.rsplit(".", 1)[0]


def _check(params: ValueZeroingParams, anatomy: ModelAnatomy) -> None:
    check_class_token_attention(anatomy)
    check_layer_index(params.layer, anatomy, "layer")
    for name in anatomy.attention_modules:
        if "." not in name or f"{name}.qkv" not in anatomy.module_names:
            raise ValueError(f"attention module {name!r} has no `qkv` projection inside a block to alter")


def _needs(params: ValueZeroingParams, anatomy: ModelAnatomy) -> CaptureNeeds:
    names = anatomy.attention_modules
    layers = aggregated_layers(params.layer, params.aggregate, anatomy)
    return CaptureNeeds(layer_inputs=frozenset(block_name(names[i]) for i in layers))


def _cost(params: ValueZeroingParams, ctx: CostContext) -> CostEstimate:
    """Each aggregated block runs once per token on altered copies: a block is 1/depth of a forward pass."""
    anatomy = ctx.anatomy
    blocks = len(aggregated_layers(params.layer, params.aggregate, anatomy))
    tokens, depth = token_count(anatomy), max(1, anatomy.num_layers)
    return CostEstimate(blocks * tokens / depth + 1,
                        f"{blocks} block(s) (aggregate={params.aggregate}) x {tokens} tokens / {depth} blocks + 1")


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - cos(a, b) over the last dimension as ||a/|a| - b/|b|||^2 / 2: the same value, without the cancellation
    of 1 - cos for the nearly parallel vectors a block's residual stream produces."""
    unit_a = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    unit_b = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return 0.5 * (unit_a - unit_b).square().sum(dim=-1)


def value_zeroing_matrix(block: nn.Module, qkv: nn.Module, inputs: torch.Tensor, chunk_size: int,
                         checkpoint: Callable[[], None] = lambda: None) -> torch.Tensor:
    """(B, N, N) cosine distances [b, i, j] between token i's block output and the output with token j's values
    zeroed, for block inputs (B, N, C); the B * N altered copies run `chunk_size` at a time, `checkpoint` (the
    runner's: stops abandoned work) before each chunk."""
    batch, n, _ = inputs.shape
    zeroed: list[torch.Tensor] = []  # token whose values the current copies zero, one per copy
    altered_calls = []

    def zero_values(_m: nn.Module, _i: object, out: torch.Tensor) -> torch.Tensor | None:
        if not zeroed:
            return None
        altered_calls.append(1)
        out = out.clone()
        third = out.shape[-1] // 3  # timm's qkv layout: [q | k | v] along the last dimension
        out[torch.arange(out.shape[0], device=out.device), zeroed[0], 2 * third:] = 0.0
        return out

    copies_image = torch.arange(batch, device=inputs.device).repeat_interleave(n)  # copy k = (image, token)
    copies_token = torch.arange(n, device=inputs.device).repeat(batch)
    handle = qkv.register_forward_hook(zero_values)
    try:
        with torch.no_grad():
            original = block(inputs)
            distances = []
            for images, tokens in zip(copies_image.split(chunk_size), copies_token.split(chunk_size)):
                checkpoint()
                zeroed[:] = [tokens]
                altered = block(inputs.index_select(0, images))
                zeroed.clear()
                distances.append(cosine_distance(altered, original.index_select(0, images)))  # [copy (b, j), i]
    finally:
        zeroed.clear()
        handle.remove()
    if len(altered_calls) != len(distances):
        raise ValueError("value_zeroing: the block does not call its attention's qkv projection once per pass")
    return torch.cat(distances).reshape(batch, n, n).transpose(1, 2)


@register_method(
    name="value_zeroing",
    description="Value zeroing (Mohebbi et al. 2023): token j's contribution to token i is the cosine distance "
    "between i's block output and the output recomputed with j's value vectors zeroed in every head; rows "
    "normalised, aggregated across blocks with the rollout product; class-token row over the patches.",
    families=("vit",),
    class_specific=False,
    params_model=ValueZeroingParams,
    needs=_needs,
    relative_cost=20.0,
    cost=MethodCost(_cost, "blocks recomputed (1 with aggregate=last, layer + 1 with rollout) x tokens / depth + 1"),
    cost_note="Expensive: every aggregated block is recomputed once per token (N altered copies per image, run "
    "in chunks of the model's explain_chunk_size). With the default aggregate=last one block: about N / depth + 1 "
    "forward passes (~20 for deit-tiny at 224, 197 tokens); with aggregate=rollout every block up to `layer`: about "
    "N forward passes (~230 for deit-tiny, ~7 s per image on a 2-core CPU).",
    check=_check,
)
def value_zeroing(captures: CaptureBatch, params: ValueZeroingParams, anatomy: ModelAnatomy) -> MethodOutput:
    runner = captures.runner
    assert runner is not None
    modules = dict(runner.module.named_modules())
    matrices = []
    for index in aggregated_layers(params.layer, params.aggregate, anatomy):
        attention = anatomy.attention_modules[index]
        block = modules[block_name(attention)]
        if runner.dtype != torch.float32:  # half precision cannot resolve one token's effect on the residual stream
            block = copy.deepcopy(block).float()
        qkv = dict(block.named_modules())[f"{attention.rsplit('.', 1)[1]}.qkv"]
        inputs = captures.layer_inputs[block_name(attention)].to(device=runner.device, dtype=torch.float32)
        distances = value_zeroing_matrix(block, qkv, inputs, runner.chunk_size or DEFAULT_CHUNK, runner.checkpoint)
        matrices.append(normalise_rows(distances))
    class_row = class_token_row(matrices)[:, anatomy.num_prefix_tokens:]
    return MethodOutput(maps=patch_tokens_to_grid(class_row, anatomy))
