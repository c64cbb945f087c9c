"""Input x gradient (Shrikumar et al. 2016): the input pixels times the target logit's gradient."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from service.explain.captures import CaptureBatch, CaptureNeeds
from service.model.anatomy import ModelAnatomy
from service.explain.methods._input import (
    INPUT_GRADIENT_COST_NOTE,
    ATTRIBUTION_REDUCE_DESCRIPTION,
    INPUT_RESOLUTION_NOTE,
    AttributionReduce,
    reduce_attribution,
)
from service.explain.registry import MethodOutput, register_method


class InputXGradientParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reduce: AttributionReduce = Field(default="sum", description=ATTRIBUTION_REDUCE_DESCRIPTION)


@register_method(
    name="input_x_gradient",
    description="Input x gradient: the (normalised) input times d(target logit)/d(input), reduced over the colour "
    "channels (signed sum by default)." + INPUT_RESOLUTION_NOTE,
    families=("vit", "cnn"),
    class_specific=True,
    params_model=InputXGradientParams,
    needs=lambda params, anatomy: CaptureNeeds(input_grad=True),
    relative_cost=2.5,
    cost_note=INPUT_GRADIENT_COST_NOTE,
)
def input_x_gradient(captures: CaptureBatch, params: InputXGradientParams, anatomy: ModelAnatomy) -> MethodOutput:
    assert captures.input_grads is not None
    return MethodOutput(maps=reduce_attribution(captures.pixels * captures.input_grads, params.reduce))
