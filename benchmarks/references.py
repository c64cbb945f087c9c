"""Our explanation methods against reference implementations, in this process, on identical inputs.

- Grad-CAM against pytorch-grad-cam's GradCAM (a ViT with its token-to-grid reshape transform, and a CNN);
- attention rollout against a per-image loop written the way the method's usual write-ups do it (forward hooks
  on `attn_drop` with timm's fused attention switched off, one image at a time, the product in numpy), but
  correct (rows renormalised after adding the identity, prefix tokens kept);
- once methods named `saliency` / `integrated_gradients` are registered, Captum's Saliency and
  IntegratedGradients with the same steps;
- the relevance-propagation methods (`benchmarks.relevance_references`, the references their tests use): `lrp`
  against zennit's Gradient attributor called directly (same composite and canonizers, on a copy of the CNN),
  `attn_lrp` against lxt's explicit AttnLRP rules composed into the ViT's forward pass (batched), and
  `transformer_attribution` against the per-image port of Chefer et al.'s relprop code (float32, as the authors run
  it).

For each: the speed ratio (reference time / ours, both producing the maps from the same input batch) and the
largest absolute difference of the min-max-normalised maps, compared at the same resolution (pytorch-grad-cam's
own normalise, resize to the input, normalise again is replicated on our maps). The relevance maps are signed: their
difference is taken relative to each reference map's largest |value| (the tests' tolerance), and they have no
speed-up target (the same computation as the reference, batched; reported for information).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.timing import interleaved, median, spread
from service.model.anatomy import attention_modules
from service.explain.requests import resolve_methods
from service.explain.pipeline import ExplainJob, run_explain_batch
from service.explain.registry import all_methods
from service.explain.targets import TargetRequest
from service.model.served import ServedModel

log = logging.getLogger(__name__)

MAX_ABS_DIFF_TARGET = 1e-4
REFERENCE_SPEEDUP = 1.5  # the speed-up target of the comparisons that have one
MINMAX = "of the min-max-normalised maps"
RELATIVE = "relative to each reference map's largest absolute value"


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """Each (h, w) map of a (B, h, w) stack scaled to 0..1 (as pytorch-grad-cam does, with its epsilon)."""
    maps = maps - maps.amin(dim=(-2, -1), keepdim=True)
    return maps / (1e-7 + maps.amax(dim=(-2, -1), keepdim=True))


def pytorch_grad_cam_scale(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Normalise, upsample (bilinear) to the input size and normalise again, as pytorch-grad-cam does."""
    upsampled = F.interpolate(minmax(maps.float())[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return minmax(upsampled)


def max_abs_difference(ours: torch.Tensor | np.ndarray, theirs: torch.Tensor | np.ndarray) -> float:
    a = torch.as_tensor(np.asarray(ours, dtype=np.float64))
    b = torch.as_tensor(np.asarray(theirs, dtype=np.float64))
    return float((a - b).abs().max())


def relative_difference(ours: torch.Tensor | np.ndarray, theirs: torch.Tensor | np.ndarray) -> float:
    """Signed maps (B, h, w): the largest |ours - theirs| of each image divided by the largest |theirs| of that
    image, the largest over the batch."""
    a = torch.as_tensor(np.asarray(ours, dtype=np.float64))
    b = torch.as_tensor(np.asarray(theirs, dtype=np.float64))
    scale = b.abs().flatten(1).amax(dim=1)
    if bool((scale == 0).any()):
        raise ValueError("a reference map is zero everywhere: nothing to compare")
    return float(((a - b).abs().flatten(1).amax(dim=1) / scale).max())


def our_maps(served: ServedModel, pixels: torch.Tensor, method: str, targets: list[int] | None,
             params: dict[str, Any] | None = None) -> torch.Tensor:
    """Our pipeline's maps (B, h, w) for one method, for the given target per image (or top-1)."""
    spec = method if params is None else {"name": method, "params": params}
    from api_schemas import MethodSpec

    requests = resolve_methods([spec if isinstance(spec, str) else MethodSpec(**spec)], served.family,
                               served.anatomy)
    wanted = [TargetRequest(index=t) for t in targets] if targets is not None else [TargetRequest(top_k=1)] * len(pixels)
    jobs = [ExplainJob(pixels[i], requests, wanted[i]) for i in range(len(pixels))]
    outcomes = run_explain_batch(served, jobs)
    return torch.stack([outcome.methods[0].maps[0] for outcome in outcomes])


def _compare(
    name: str, reference: str, served: ServedModel, ours: Callable[[], torch.Tensor],
    theirs: Callable[[], np.ndarray | torch.Tensor], budget_s: float, batch: int, note: str | None = None,
    min_repeats: int = 2, signed: bool = False, tolerance: float = MAX_ABS_DIFF_TARGET,
    speedup_target: float | None = REFERENCE_SPEEDUP,
) -> dict[str, Any]:
    """`signed`: the maps' difference relative to each reference map's largest |value| (`relative_difference`),
    else the plain largest difference (of maps the callables have normalised)."""
    ours_out = ours()  # also the warm-up of both
    theirs_out = theirs()
    difference = (relative_difference if signed else max_abs_difference)(ours_out, theirs_out)
    our_times, their_times = interleaved([ours, theirs], served.device, budget_s, min_repeats=min_repeats, warmup=0)
    speedup = min(their_times) / min(our_times)  # best of n each: interference only ever adds time
    return {
        "comparison": name,
        "reference": reference,
        "model": served.id,
        "architecture": served.architecture,
        "family": served.family,
        "batch_size": batch,
        "repeats": len(our_times),
        "ours_ms_per_image": min(our_times) * 1000.0 / batch,
        "reference_ms_per_image": min(their_times) * 1000.0 / batch,
        "speedup": speedup,
        "speedup_median": median(their_times) / median(our_times),
        "max_abs_diff": difference,
        "difference": RELATIVE if signed else MINMAX,
        "tolerance": tolerance,
        "speedup_target": speedup_target,
        "spread": max(spread(our_times), spread(their_times)),
        "status": "ok",
        "note": note,
    }


def _skipped(name: str, reference: str, served: ServedModel | None, why: str, status: str = "skipped") -> dict[str, Any]:
    return {"comparison": name, "reference": reference, "model": None if served is None else served.id,
            "architecture": None if served is None else served.architecture,
            "family": None if served is None else served.family, "status": status, "note": why}


def _guard(name: str, reference: str, served: ServedModel, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return run()
    except ImportError as exc:
        return _skipped(name, reference, served, f"{exc.name or exc} is not installed (pip install -e '.[bench]')")
    except Exception as exc:  # noqa: BLE001 - one failing comparison must not end the benchmark
        log.exception("comparison %r failed", name)
        return _skipped(name, reference, served, f"{type(exc).__name__}: {exc}", status="error")


# --- Grad-CAM ----------------------------------------------------------------------------------------------------


def vit_reshape_transform(prefix: int, grid: tuple[int, int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """pytorch-grad-cam's `reshape_transform` for a ViT: tokens (B, N, C) -> the patch grid (B, C, rows, cols),
    prefix tokens (class, registers) dropped."""
    rows, cols = grid

    def reshape(tensor: torch.Tensor) -> torch.Tensor:
        patches = tensor[:, prefix:, :].reshape(tensor.size(0), rows, cols, tensor.size(2))
        return patches.permute(0, 3, 1, 2)

    return reshape


def pytorch_grad_cam_maps(served: ServedModel, cam_class: type, pixels: torch.Tensor, targets: list[int],
                          layer_name: str) -> np.ndarray:
    """pytorch-grad-cam's maps (B, H, W) at the input size from `cam_class` (GradCAM, GradCAMPlusPlus, LayerCAM...)
    on layer `layer_name`, one target class per image, with its token-to-grid reshape transform on ViTs.

    Its hooks live for the call only, so they do not slow our own passes down."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = served.active_network
    layer = model.get_submodule(layer_name)
    reshape = None
    if served.family == "vit":
        reshape = vit_reshape_transform(served.anatomy.num_prefix_tokens, served.anatomy.grid_size)

    model.requires_grad_(True)  # pytorch-grad-cam back-propagates through the parameters' graph
    try:
        with cam_class(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
            return cam(input_tensor=pixels, targets=[ClassifierOutputTarget(t) for t in targets])
    finally:
        model.requires_grad_(False)
        model.zero_grad(set_to_none=True)


def gradcam_comparison(served: ServedModel, pixels: torch.Tensor, budget_s: float) -> dict[str, Any]:
    name = f"gradcam ({served.family})"
    reference = "pytorch-grad-cam GradCAM"

    def run() -> dict[str, Any]:
        from pytorch_grad_cam import GradCAM

        layer_name = served.anatomy.feature_layer
        with torch.inference_mode():
            targets = served.predict_probabilities(pixels).argmax(-1).tolist()
        size = tuple(served.input_size[1:])
        x = pixels.to(served.dtype)

        def theirs() -> np.ndarray:
            return pytorch_grad_cam_maps(served, GradCAM, x, targets, layer_name)

        return _compare(
            name, reference, served,
            lambda: pytorch_grad_cam_scale(our_maps(served, pixels, "gradcam", targets), size),
            theirs, budget_s, len(pixels),
            note=f"layer {layer_name}; ours includes the normalise-upsample-normalise to the input size",
        )

    return _guard(name, reference, served, run)


# --- Attention rollout -------------------------------------------------------------------------------------------


class PerImageRollout:
    """Attention rollout the way it is usually written: hooks on `attn_drop`, one image at a time, numpy product."""

    def __init__(self, model: torch.nn.Module, num_prefix_tokens: int, grid: tuple[int, int]) -> None:
        self.model = model
        self.num_prefix_tokens = num_prefix_tokens
        self.grid = grid
        self.attentions: list[np.ndarray] = []
        self.handles = []
        self.switched = []
        for _, attention in attention_modules(model):
            self.switched.append((attention, attention.fused_attn))
            attention.fused_attn = False  # timm's fused kernel never materialises the probabilities
        for name, module in model.named_modules():
            if name.endswith("attn_drop"):
                self.handles.append(module.register_forward_hook(self._keep))

    def _keep(self, _module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> None:
        self.attentions.append(output.detach().float().cpu().numpy())

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        for attention, fused in self.switched:
            attention.fused_attn = fused

    def __call__(self, image: torch.Tensor) -> np.ndarray:
        self.attentions = []
        with torch.no_grad():
            self.model(image)
        tokens = self.attentions[0].shape[-1]
        identity = np.eye(tokens, dtype=np.float32)
        result = identity
        for attention in self.attentions:
            fused = attention[0].mean(axis=0)
            a = 0.5 * fused + 0.5 * identity
            a = a / a.sum(axis=-1, keepdims=True)
            result = a @ result
        return result[0, self.num_prefix_tokens:].reshape(self.grid)

    def explain(self, pixels: torch.Tensor) -> np.ndarray:
        return np.stack([self(pixels[i:i + 1]) for i in range(len(pixels))])


class PerImageGAE:
    """GAE (Chefer, Gur & Wolf 2021) the way their ViT notebook computes it: hooks on `attn_drop` keep each block's
    attention probabilities and, through a tensor hook, their gradient of the target logit; one image at a time, one
    backward pass each. Returns the class token's relevance over the patches on the grid, (rows, cols)."""

    def __init__(self, model: torch.nn.Module, num_prefix_tokens: int, grid: tuple[int, int]) -> None:
        self.model = model
        self.num_prefix_tokens = num_prefix_tokens
        self.grid = grid
        self.attentions: list[torch.Tensor] = []
        self.gradients: dict[int, torch.Tensor] = {}
        self.handles = []
        self.switched = []
        for _, attention in attention_modules(model):
            self.switched.append((attention, attention.fused_attn))
            attention.fused_attn = False  # the fused kernel never materialises the probabilities
        for name, module in model.named_modules():
            if name.endswith("attn_drop"):
                self.handles.append(module.register_forward_hook(self._keep))

    def _keep(self, _module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> None:
        index = len(self.attentions)
        self.attentions.append(output.detach())
        if output.requires_grad:
            output.register_hook(lambda grad: self.gradients.__setitem__(index, grad.detach()))

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        for attention, fused in self.switched:
            attention.fused_attn = fused

    def __call__(self, image: torch.Tensor, target: int) -> torch.Tensor:
        self.attentions, self.gradients = [], {}
        with torch.enable_grad():
            x = image.detach().requires_grad_(True)
            self.model(x)[0, target].backward()
        n = self.attentions[0].shape[-1]
        relevance = torch.eye(n, dtype=torch.float32, device=image.device)
        for index, attention in enumerate(self.attentions):
            cam = (self.gradients[index][0] * attention[0]).float().clamp(min=0).mean(dim=0)
            relevance = relevance + cam @ relevance
        return relevance[0, self.num_prefix_tokens:].reshape(self.grid)

    def explain(self, pixels: torch.Tensor, targets: list[int]) -> torch.Tensor:
        return torch.stack([self(pixels[i:i + 1], t) for i, t in enumerate(targets)])


def rollout_comparison(served: ServedModel, pixels: torch.Tensor, budget_s: float) -> dict[str, Any]:
    name = "rollout"
    reference = "per-image loop (attn_drop hooks, numpy)"

    def run() -> dict[str, Any]:
        anatomy = served.anatomy
        batch = pixels.to(served.device, served.dtype)

        def theirs() -> torch.Tensor:
            # Its hooks live for the call only, so they do not slow our own passes down.
            loop = PerImageRollout(served.active_network, anatomy.num_prefix_tokens, anatomy.grid_size)  # type: ignore[arg-type]
            try:
                return minmax(torch.from_numpy(loop.explain(batch)))
            finally:
                loop.close()

        return _compare(
            name, reference, served, lambda: minmax(our_maps(served, pixels, "rollout", None)), theirs,
            budget_s, len(pixels), note="head fusion mean, no discarding (the defaults); maps on the patch grid",
        )

    if served.family != "vit" or not served.anatomy.has_class_token:
        return _skipped(name, reference, served, "needs a ViT with a class token")
    return _guard(name, reference, served, run)


# --- Captum ------------------------------------------------------------------------------------------------------

# Images of the Captum comparisons whose methods run the model once per integration step.
PATH_METHOD_IMAGES = 2


def reduce_channels(attributions: torch.Tensor, how: str) -> torch.Tensor:
    """(B, C, H, W) -> (B, H, W), by the reductions our input-attribution methods offer."""
    reductions = {
        "max": lambda a: a.abs().amax(dim=1),
        "mean": lambda a: a.abs().mean(dim=1),
        "l2": lambda a: a.pow(2).sum(dim=1).sqrt(),
        "sum": lambda a: a.sum(dim=1),
        "abs_sum": lambda a: a.abs().sum(dim=1),
    }
    if how not in reductions:
        raise ValueError(f"no reduction {how!r} coded for the comparison")
    return reductions[how](attributions)


def captum_comparison(served: ServedModel, pixels: torch.Tensor, budget_s: float, method: str) -> dict[str, Any]:
    """Captum's Saliency or IntegratedGradients against our method of that name, with its default params."""
    reference = {"saliency": "Captum Saliency", "integrated_gradients": "Captum IntegratedGradients"}[method]
    registered = all_methods().get(method)
    if registered is None:
        return _skipped(method, reference, served, f"no method named {method!r} is registered")
    if served.family not in registered.families:
        return _skipped(method, reference, served, f"{method!r} does not apply to {served.family} models")

    def run() -> dict[str, Any]:
        from captum.attr import IntegratedGradients, Saliency

        params = registered.params_model().model_dump()
        x = pixels if method == "saliency" else pixels[:PATH_METHOD_IMAGES]
        with torch.inference_mode():
            targets = served.predict_probabilities(x).argmax(-1).tolist()
        inputs = x.to(served.device, served.dtype)
        target_tensor = torch.tensor(targets, device=served.device)
        size = tuple(served.input_size[1:])
        model = served.active_network
        reduction = str(params.get("reduce", "max" if method == "saliency" else "sum"))
        repeats = 2
        if method == "saliency":
            def theirs() -> torch.Tensor:
                attributions = Saliency(model).attribute(inputs, target=target_tensor, abs=True)
                return minmax(reduce_channels(attributions.float(), reduction))
            note = f"|gradient|, channels reduced by {reduction}"
        else:
            steps, integration = int(params["steps"]), str(params["integration"])
            if params.get("baseline") != "black":
                raise ValueError(f"no Captum baseline coded for {params.get('baseline')!r}")
            mean = torch.tensor(served.data_config["mean"], dtype=inputs.dtype, device=inputs.device).view(1, -1, 1, 1)
            std = torch.tensor(served.data_config["std"], dtype=inputs.dtype, device=inputs.device).view(1, -1, 1, 1)
            black = ((0.0 - mean) / std).expand_as(inputs).contiguous()

            def theirs() -> torch.Tensor:
                attributions = IntegratedGradients(model).attribute(
                    inputs, baselines=black, target=target_tensor, n_steps=steps, method=integration,
                    internal_batch_size=served.config.explain_chunk_size,
                )
                return minmax(reduce_channels(attributions.float(), reduction))
            note = (f"{steps} steps ({integration}), black baseline, channels reduced by {reduction}; "
                    f"{len(x)} images (each runs the model {steps} times)")
            repeats = 1

        def ours() -> torch.Tensor:
            maps = our_maps(served, x, method, targets)
            if tuple(maps.shape[-2:]) != size:
                maps = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
            return minmax(maps)

        return _compare(method, reference, served, ours, theirs, budget_s, len(x), note=note, min_repeats=repeats)

    return _guard(method, reference, served, run)


# --- Relevance propagation ---------------------------------------------------------------------------------------

# Largest difference of the signed maps relative to each reference map's largest |value|: the tolerances of the
# methods' tests against the same references (tests/test_explain_lrp.py, test_explain_attn_lrp.py,
# test_explain_transformer_attribution.py).
LRP_TOLERANCE = 1e-6
ATTN_LRP_TOLERANCE = 1e-5
TRANSFORMER_ATTRIBUTION_TOLERANCE = 2e-5


def _top1(served: ServedModel, pixels: torch.Tensor) -> list[int]:
    with torch.inference_mode():
        return served.predict_probabilities(pixels).argmax(-1).tolist()


def _reference_copy(served: ServedModel) -> torch.nn.Module:
    """The reference's own float32 copy of the network (made once, outside the timing): references that canonize or
    hook the model in place never touch the served one."""
    return copy.deepcopy(served.active_network).float().eval().requires_grad_(False)


def _method_params(method: str, served: ServedModel) -> tuple[dict[str, Any] | None, str | None]:
    registered = all_methods().get(method)
    if registered is None:
        return None, f"no method named {method!r} is registered"
    if served.family not in registered.families:
        return None, f"{method!r} does not apply to {served.family} models"
    return registered.params_model().model_dump(), None


def lrp_comparison(served: ServedModel, pixels: torch.Tensor, budget_s: float) -> dict[str, Any]:
    """`lrp` (defaults: composite epsilon_plus_flat) against zennit's Gradient attributor with zennit's
    EpsilonPlusFlat and the same canonizers (zennit's SequentialMergeBatchNorm, and the method's addition canonizer:
    zennit has none for timm's in-place residual additions), batched, on a copy of the network."""
    name, reference = "lrp", "zennit Gradient, EpsilonPlusFlat"
    params, why = _method_params(name, served)
    if params is None:
        return _skipped(name, reference, served, why or "")

    def run() -> dict[str, Any]:
        from zennit.canonizers import SequentialMergeBatchNorm
        from zennit.composites import EpsilonPlusFlat

        from benchmarks.relevance_references import zennit_lrp_maps
        from service.explain.methods._lrp import AdditionCanonizer

        if params["composite"] != "epsilon_plus_flat":
            raise ValueError(f"no zennit composite coded for {params['composite']!r}")
        targets = _top1(served, pixels)
        model = _reference_copy(served)
        x = pixels.to(served.device, torch.float32)

        def theirs() -> torch.Tensor:
            composite = EpsilonPlusFlat(epsilon=params["epsilon"],
                                        canonizers=[SequentialMergeBatchNorm(), AdditionCanonizer()])
            return zennit_lrp_maps(model, composite, x, targets).cpu()

        return _compare(
            name, reference, served, lambda: our_maps(served, pixels, name, targets).float(), theirs, budget_s,
            len(pixels), signed=True, tolerance=LRP_TOLERANCE, speedup_target=None,
            note=f"epsilon {params['epsilon']:g}, batch norms merged, residual additions by the Norm rule; pixel "
                 f"maps; max abs diff {RELATIVE}",
        )

    return _guard(name, reference, served, run)


def _float64_twin(served: ServedModel) -> ServedModel:
    """The served model again, on a float64 copy of its network: our pipeline at float64 precision."""
    twin = dataclasses.replace(served, network=copy.deepcopy(served.network), dtype=torch.float64)
    twin.ready = True
    return twin


def attn_lrp_comparison(served: ServedModel, pixels: torch.Tensor, budget_s: float) -> dict[str, Any]:
    """`attn_lrp` (default epsilon, pixel resolution) against lxt's explicit AttnLRP rules composed into the ViT's
    forward pass, batched, on a copy of the network; lxt's linear_epsilon stabilised with the sign (as ours), its
    non-linear rules' stabilisers vanishing (ours have none). Timed in the model's precision; the equality check
    (`max_abs_diff`) runs both once more in float64, since on a deep random-weight ViT float32 rounding alone moves
    either map by up to about 1% of its peak (`max_abs_diff_timed`: the difference of the timed maps)."""
    name, reference = "attn_lrp", "lxt explicit AttnLRP rules"
    params, why = _method_params(name, served)
    if params is None:
        return _skipped(name, reference, served, why or "")

    def run() -> dict[str, Any]:
        from benchmarks.relevance_references import lxt_attn_lrp, lxt_explicit, signed_lxt_stabiliser

        lxt_explicit()  # ImportError (a skip) without lxt
        targets = _top1(served, pixels)
        model = _reference_copy(served)
        target_tensor = torch.tensor(targets, device=served.device)
        epsilon = float(params["epsilon"])
        ours_params = {**params, "resolution": "pixels"}

        def lxt_maps(network: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
            with signed_lxt_stabiliser():
                relevance, _ = lxt_attn_lrp(network, pixels.to(served.device, dtype), target_tensor,
                                            linear_epsilon=epsilon, copy_model=False)
            return relevance.sum(dim=1).cpu()

        row = _compare(
            name, reference, served, lambda: our_maps(served, pixels, name, targets, ours_params).float(),
            lambda: lxt_maps(model, torch.float32), budget_s, len(pixels), signed=True,
            tolerance=ATTN_LRP_TOLERANCE, speedup_target=None,
        )
        model64 = model.double()
        row["max_abs_diff_timed"] = row["max_abs_diff"]
        row["max_abs_diff"] = relative_difference(our_maps(_float64_twin(served), pixels, name, targets, ours_params),
                                                  lxt_maps(model64, torch.float64))
        row["difference"] = f"{RELATIVE}, both run in float64"
        row["note"] = (f"epsilon {epsilon:g}; pixel maps (the default resolution sums them per patch); max abs diff "
                       f"{RELATIVE}, both in float64 ({row['max_abs_diff_timed']:.1e} between the timed "
                       f"{str(served.dtype).removeprefix('torch.')} maps)")
        return row

    if served.family == "vit" and not served.anatomy.has_class_token:
        return _skipped(name, reference, served, "the lxt reference is written for a ViT with a class token")
    return _guard(name, reference, served, run)


def _per_image_relative(ours: torch.Tensor, theirs: torch.Tensor) -> list[float]:
    """`relative_difference` of each image."""
    return [relative_difference(ours[i:i + 1], theirs[i:i + 1]) for i in range(len(theirs))]


def transformer_attribution_comparison(served: ServedModel, pixels: torch.Tensor, budget_s: float,
                                       ) -> dict[str, Any]:
    """`transformer_attribution` (defaults) against the per-image port of the authors' relprop code (float32, one
    image at a time, as their code runs), on a copy of the network.

    The method computes its rules and rollout in float32 whatever the model's dtype, so the maps compared are float32
    maps. On a deep random-weight ViT the residual rule (which rescales relevance by sums that nearly cancel) makes
    float32 rounding matter: the reference's own float32 and float64 runs then differ by up to tens of times the
    map's peak on some images. So each image's tolerance is the test's, or where larger, the reference's own float32
    error on that image (its float64 run, once); `max_abs_diff` is the largest difference, `within_tolerance` the
    largest ratio of an image's difference to its tolerance (at most 1: equal outputs)."""
    name, reference = "transformer_attribution", "Chefer et al. relprop, per image"
    params, why = _method_params(name, served)
    if params is None:
        return _skipped(name, reference, served, why or "")

    def run() -> dict[str, Any]:
        from benchmarks.relevance_references import chefer_maps

        targets = _top1(served, pixels)
        model = _reference_copy(served)
        start = int(params["start_layer"]) % served.anatomy.num_layers
        grid = served.anatomy.grid_size
        last: dict[str, torch.Tensor] = {}

        def ours() -> torch.Tensor:
            last["ours"] = our_maps(served, pixels, name, targets).float()
            return last["ours"]

        def theirs() -> torch.Tensor:
            last["theirs"] = chefer_maps(model, pixels.to(served.device, torch.float32), targets, start, grid).cpu()
            return last["theirs"]

        row = _compare(name, reference, served, ours, theirs, budget_s, len(pixels), signed=True,
                       tolerance=TRANSFORMER_ATTRIBUTION_TOLERANCE, speedup_target=None)
        precise = chefer_maps(model.double(), pixels.to(served.device, torch.float64), targets, start, grid).cpu()
        errors = _per_image_relative(last["theirs"], precise)
        differences = _per_image_relative(last["ours"], last["theirs"])
        tolerances = [max(TRANSFORMER_ATTRIBUTION_TOLERANCE, e) for e in errors]
        row["reference_float32_error"] = max(errors)
        row["within_tolerance"] = max(d / t for d, t in zip(differences, tolerances))
        row["note"] = (f"start_layer {params['start_layer']}; the reference in float32, as the authors run it (its "
                       f"float64 run differs from it by up to {max(errors):.1e}); maps on the patch grid; max abs diff "
                       f"{RELATIVE}; each image within max({TRANSFORMER_ATTRIBUTION_TOLERANCE:g}, the reference's own "
                       f"float32 error): {row['within_tolerance']:.2f} of it at most")
        return row

    if served.family == "vit" and not served.anatomy.has_class_token:
        return _skipped(name, reference, served, "needs a ViT with a class token")
    return _guard(name, reference, served, run)
