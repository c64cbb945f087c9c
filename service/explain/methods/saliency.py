"""Saliency (Simonyan et al. 2014): the magnitude of the target logit's gradient with respect to the input pixels."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from service.explain.captures import CaptureBatch, CaptureNeeds
from service.model.anatomy import ModelAnatomy
from service.explain.methods._input import (
    INPUT_GRADIENT_COST_NOTE,
    INPUT_RESOLUTION_NOTE,
    MAGNITUDE_REDUCE_DESCRIPTION,
    MagnitudeReduce,
    reduce_magnitude,
)
from service.explain.registry import MethodOutput, register_method


class SaliencyParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reduce: MagnitudeReduce = Field(default="max", description=MAGNITUDE_REDUCE_DESCRIPTION)


@register_method(
    name="saliency",
    description="Saliency (vanilla gradient): |d(target logit)/d(input pixel)|, reduced over the colour channels."
    + INPUT_RESOLUTION_NOTE,
    families=("vit", "cnn"),
    class_specific=True,
    params_model=SaliencyParams,
    needs=lambda params, anatomy: CaptureNeeds(input_grad=True),
    relative_cost=2.5,
    cost_note=INPUT_GRADIENT_COST_NOTE,
)
def saliency(captures: CaptureBatch, params: SaliencyParams, anatomy: ModelAnatomy) -> MethodOutput:
    assert captures.input_grads is not None
    return MethodOutput(maps=reduce_magnitude(captures.input_grads, params.reduce))
