"""Our explanation methods against reference implementations, in this process, on identical inputs.

- Grad-CAM against pytorch-grad-cam's GradCAM (a ViT with its token-to-grid reshape transform, and a CNN);
- attention rollout against a per-image loop written the way the method's usual write-ups do it (forward hooks
  on `attn_drop` with timm's fused attention switched off, one image at a time, the product in numpy), but
  correct (rows renormalised after adding the identity, prefix tokens kept);
- once methods named `saliency` / `integrated_gradients` are registered, Captum's Saliency and
  IntegratedGradients with the same steps.

For each: the speed ratio (reference time / ours, both producing the maps from the same input batch) and the
largest absolute difference of the min-max-normalised maps, compared at the same resolution (pytorch-grad-cam's
own normalise, resize to the input, normalise again is replicated on our maps).
"""

from __future__ import annotations

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
    min_repeats: int = 2,
) -> dict[str, Any]:
    ours_out = ours()  # also the warm-up of both
    theirs_out = theirs()
    difference = max_abs_difference(ours_out, theirs_out)
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
        prefix, (rows, cols) = served.anatomy.num_prefix_tokens, served.anatomy.grid_size

        def reshape(tensor: torch.Tensor) -> torch.Tensor:
            patches = tensor[:, prefix:, :].reshape(tensor.size(0), rows, cols, tensor.size(2))
            return patches.permute(0, 3, 1, 2)

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
