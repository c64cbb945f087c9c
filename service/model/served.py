"""A loaded, warmed model with everything needed to serve it: preprocessing, labels, weights provenance."""

from __future__ import annotations

import copy
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from timm.data.transforms import MaybeToTensor
from torch import nn
from torchvision import transforms as T
from torchvision.transforms.v2.functional import resize_image

from service.config import ModelConfig, ServerSettings
from service.model.anatomy import ModelAnatomy, analyse_model, model_family
from service.model.labels import load_labels
from service.model.placement import resolve_device, resolve_dtype
from service.model.weights import WeightsOutcome, create_model_with_weights

log = logging.getLogger(__name__)


_thread = threading.local()


def use_copy(index: int) -> None:
    """Make the calling thread run copy `index` of every served model (each device lane's thread binds its own)."""
    _thread.copy = index


def copy_in_use() -> int:
    """The copy of the served models the calling thread runs: 0 (the network as loaded) unless bound."""
    return getattr(_thread, "copy", 0)


@dataclass(frozen=True)
class _TensorTransform:
    """The steps of an eval transform `Resize -> CenterCrop -> ToTensor -> Normalize` (what timm's `create_transform`
    builds for crop_mode "center"), run on a uint8 tensor instead of a PIL image.

    The resize is torch's native uint8 antialiased resample (the same filter as Pillow's, with lower-precision
    fixed-point weights) where the transform runs Pillow's, for a few times less CPU. Tolerance, in uint8 levels
    before normalisation (1 level = 1/255), tested in tests/test_fast_preprocessing.py: values differ from Pillow's
    by at most 1 level but for about 1 in 10^5, which differ by 2 on photos and, on pixel noise, rarely up to 4;
    the mean difference is under 0.01 level. Output sizes and crop offsets are torchvision's, the same for tensors
    and PIL images; the to-float and normalisation arithmetic is ToTensor's and Normalize's own.
    """

    resize: T.Resize
    crop: T.CenterCrop
    normalize: T.Normalize

    @classmethod
    def matching(cls, transform: Any) -> _TensorTransform | None:
        """The fast equivalent of `transform`, or None where it is anything other than that exact pipeline."""
        steps = getattr(transform, "transforms", None)
        if type(transform) is not T.Compose or not isinstance(steps, list) or len(steps) != 4:
            return None
        resize, crop, to_tensor, normalize = steps
        if (
            type(resize) is not T.Resize
            # the short side to one length (timm's crop_mode "center"); not a (height, width), such as "squash"
            # builds: torch's resample strays further from Pillow's where the two axes scale differently
            or not (isinstance(resize.size, int) or len(resize.size) == 1)
            or resize.interpolation not in (T.InterpolationMode.BICUBIC, T.InterpolationMode.BILINEAR)
            or resize.antialias not in (True, None)  # None: Pillow antialiases regardless; the tensor path always does
            or type(crop) is not T.CenterCrop
            or type(to_tensor) not in (MaybeToTensor, T.ToTensor)
            or type(normalize) is not T.Normalize
            or normalize.inplace
        ):
            return None
        return cls(resize, crop, normalize)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # uint8 (C, H, W), channels-last in memory
        size = [self.resize.size] if isinstance(self.resize.size, int) else list(self.resize.size)
        pixels = resize_image(pixels, size, self.resize.interpolation, self.resize.max_size, antialias=True)
        pixels = self.crop(pixels)
        pixels = pixels.to(torch.float32, memory_format=torch.contiguous_format).div_(255)  # ToTensor's arithmetic
        return self.normalize(pixels)


def weight_sharing_copy(module: nn.Module) -> nn.Module:
    """A copy of the module that shares its parameters and buffers (its own hooks and attribute flags)."""
    shared = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, shared)


@dataclass
class ServedModel:
    """One model as the server holds it.

    `network` is the network as loaded; `copies` holds one network per device lane (the first is `network` itself,
    the others share its weights), and `active_network` is the calling thread's: batches running at once on a CPU's
    lanes each install their own capture hooks and attention switches.
    """

    id: str
    architecture: str
    network: nn.Module
    weights: WeightsOutcome
    labels: list[str]
    data_config: dict[str, Any]
    device: torch.device
    dtype: torch.dtype
    config: ModelConfig
    transform: Callable[[Image.Image], torch.Tensor] = field(init=False)
    family: str = field(init=False)
    anatomy: ModelAnatomy = field(init=False)
    ready: bool = False
    failure: str | None = None  # why the model can never become ready (its warm-up failed)
    copies: list[nn.Module] = field(init=False)  # one per lane; the first is `network` itself
    # `transform` run on a uint8 tensor (within `_TensorTransform`'s tolerance), where the tensor path reproduces it
    fast_transform: _TensorTransform | None = field(init=False)

    def __post_init__(self) -> None:
        self.network.eval().requires_grad_(False)
        self.network.to(device=self.device, dtype=self.dtype)
        self.copies = [self.network]
        self.transform = create_transform(**self.data_config, is_training=False)
        self.fast_transform = None if self.config.exact_preprocessing else _TensorTransform.matching(self.transform)
        self.family = model_family(self.network)
        self.anatomy = analyse_model(self.network, self.family, self.input_size)

    @property
    def active_network(self) -> nn.Module:
        """The network for the calling thread: its lane's copy (the network itself off the lanes)."""
        index = copy_in_use()
        return self.copies[index] if index < len(self.copies) else self.network

    def make_copies(self, count: int) -> None:
        """Have one network per lane, `count` in all (before the lanes run anything)."""
        try:
            self.copies = [self.network] + [weight_sharing_copy(self.network) for _ in range(count - 1)]
        except Exception as exc:  # noqa: BLE001 - named, with the way out
            raise RuntimeError(f"model {self.id!r} cannot be copied for {count} CPU lanes ({type(exc).__name__}: "
                               f"{exc}); set cpu_workers = 1 to serve it") from exc

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(self.data_config["input_size"])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """timm's eval transform for this model: resize, crop, to tensor, normalise. Returns (C, H, W) float32.

        For timm's usual resize-and-centre-crop transform, the steps run on a uint8 tensor (`fast_transform`): the
        resize is torch's antialiased uint8 resample instead of Pillow's, within 1 uint8 level of it for all but about
        1 value in 10^5 (the tolerance is `_TensorTransform`'s), for a fraction of the CPU. Other transforms run as
        built.
        """
        fast = self.fast_transform
        if fast is not None and image.mode == "RGB":
            return fast(image)
        return self.transform(image)

    @torch.inference_mode()
    def predict_probabilities(self, pixels: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities (float32, on the CPU) for a batch of preprocessed images."""
        batch = pixels.to(device=self.device, dtype=self.dtype, non_blocking=True)
        logits = self.active_network(batch)
        return logits.float().softmax(dim=-1).cpu()

    def warm_up(self, batch_sizes: list[int]) -> None:
        """Forward passes at the batch sizes the queue will form, so no client pays for first-call set-up.

        Run on each lane: it warms that lane's copy and thread. Marking the model ready is the caller's business.
        """
        start = time.perf_counter()
        for size in batch_sizes:
            self.predict_probabilities(torch.zeros((size, *self.input_size)))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        log.info("model %r warm on lane %d (batch sizes %s) in %.2fs", self.id, copy_in_use(), batch_sizes,
                 time.perf_counter() - start)


def model_data_config(module: nn.Module, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """timm's data config for the model, with the input size the model was actually built for."""
    args = dict(overrides or {})
    img_size = getattr(getattr(module, "patch_embed", None), "img_size", None)
    if "input_size" not in args and img_size is not None:
        in_chans = resolve_data_config({}, model=module)["input_size"][0]
        args["input_size"] = (in_chans, *img_size)
    return resolve_data_config(args, model=module)


def load_served_model(config: ModelConfig, settings: ServerSettings) -> ServedModel:
    """Create the timm model, load its weights from the configured source and wrap it for serving."""
    device = resolve_device(config.device or settings.device)
    dtype = resolve_dtype(config.dtype or settings.dtype, device)
    module, weights = create_model_with_weights(config)
    data_config = model_data_config(module, config.data_config)
    labels = load_labels(module.num_classes, config.labels_file)
    served = ServedModel(
        id=config.id,
        architecture=config.architecture,
        network=module,
        weights=weights,
        labels=labels,
        data_config=data_config,
        device=device,
        dtype=dtype,
        config=config,
    )
    if weights.random:
        log.warning("model %r (%s) is running on RANDOM weights: its predictions are meaningless", config.id,
                    config.architecture)
    else:
        log.info("model %r (%s) loaded with weights from %s on %s/%s", config.id, config.architecture,
                 config.weights, device, str(dtype).removeprefix("torch."))
    return served

