"""Layer-wise relevance propagation (Bach et al. 2015, "On Pixel-Wise Explanations for Non-Linear Classifier
Decisions by Layer-Wise Relevance Propagation"; composites after Montavon et al. 2019 and Kohlbrenner et al. 2020)
for CNNs, through the zennit library (Anders et al. 2021)."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from service.explain.captures import CaptureBatch, CaptureNeeds
from service.explain.methods._input import INPUT_RESOLUTION_NOTE
from service.explain.methods._lrp import (
    COMPOSITE_DESCRIPTION,
    CompositeName,
    forget_network,
    lrp_network,
    make_composite,
    relevance,
)
from service.explain.registry import CostContext, CostEstimate, MethodCost, MethodOutput, register_method
from service.model.anatomy import ModelAnatomy


class LrpParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    composite: CompositeName = Field(default="epsilon_plus_flat", description=COMPOSITE_DESCRIPTION)
    epsilon: float = Field(
        default=1e-6, gt=0.0, le=100.0,
        description="The epsilon rule's stabiliser (dense layers; every layer with `epsilon`), added to each "
        "denominator with its sign: larger values absorb the relevance of weak or contradictory contributions.",
    )
    gamma: float = Field(
        default=0.25, ge=0.0, le=100.0,
        description="How much the gamma rule favours positive contributions (`epsilon_gamma_box` only).",
    )


# Forward passes' worth of one LRP pass per composite, measured on resnet18 (CPU, batch 4, 160 px): the model's own
# forward and backward passes, and in the backward pass every convolution and dense layer re-running its forward
# with modified weights once per term of its rule (epsilon 1, z+ 2, alpha-beta 4, gamma + box 5) and taking that
# forward's gradient.
PASS_COST: dict[str, float] = {
    "epsilon": 5.0, "epsilon_plus_flat": 9.0, "zplus": 10.0, "epsilon_alpha2_beta1": 17.0, "alpha1_beta0": 17.0,
    "epsilon_gamma_box": 18.0,
}


def _cost(params: LrpParams, ctx: CostContext) -> CostEstimate:
    per_target = PASS_COST[params.composite]
    return CostEstimate(per_target * ctx.targets,
                        f"{per_target:g} (composite={params.composite}) x {ctx.targets} target(s)")


def _pixel_bounds(captures: CaptureBatch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The pixel range [0, 1] normalised as the model's input is, (1, C, 1, 1) each (None without mean and std)."""
    runner = captures.runner
    if runner is None or runner.mean is None or runner.std is None:
        return None, None
    mean = torch.tensor(runner.mean, dtype=torch.float32, device=captures.pixels.device).view(1, -1, 1, 1)
    std = torch.tensor(runner.std, dtype=torch.float32, device=captures.pixels.device).view(1, -1, 1, 1)
    return (0.0 - mean) / std, (1.0 - mean) / std


@register_method(
    name="lrp",
    description="Layer-wise relevance propagation through zennit: each image's target logit is propagated back "
    "to the pixels with the composite's rules (one modified backward pass for the whole batch), batch norms merged "
    "into their convolutions and residual additions splitting relevance in proportion to their terms; the "
    "relevance is summed over the colour channels (signed; it sums to about the target logit, less what biases "
    "and stabilisers absorb). Products such as squeeze-excitation gates and layer scales have no rule and keep their "
    "gradient: a conservative decomposition on ResNet-style CNNs, an approximation on others." + INPUT_RESOLUTION_NOTE,
    families=("cnn",),
    class_specific=True,
    params_model=LrpParams,
    needs=lambda params, anatomy: CaptureNeeds(),
    relative_cost=PASS_COST["epsilon_plus_flat"],
    cost=MethodCost(_cost, "5 (epsilon), 9 (epsilon_plus_flat), 10 (zplus), 17 (alpha-beta composites) or 18 "
                           "(epsilon_gamma_box) x targets"),
    cost_note="Its own forward pass and one modified backward pass per target, in chunks of the model's "
    "explain_chunk_size; every convolution and dense layer re-runs its forward once per term of its rule in the "
    "backward pass. The rules run on a copy of the network's modules sharing its weights (made on first use, tens "
    "of milliseconds; half-precision models get float32 weights for the pass).",
)
def lrp(captures: CaptureBatch, params: LrpParams, anatomy: ModelAnatomy) -> MethodOutput:
    runner, targets = captures.runner, captures.targets
    assert runner is not None and targets is not None
    low, high = _pixel_bounds(captures)
    maps = []
    for pixels, chunk_targets in zip(captures.pixels.split(runner.chunk_size), targets.split(runner.chunk_size)):
        runner.checkpoint()
        network = lrp_network(runner.module)
        composite = make_composite(params.composite, params.epsilon, params.gamma, low, high)
        try:
            _, pixel_relevance = relevance(network, composite, pixels.to(runner.device), chunk_targets)
        except BaseException:
            forget_network(runner.module)
            raise
        maps.append(pixel_relevance.sum(dim=1).to(captures.pixels.device))
    return MethodOutput(maps=torch.cat(maps))
