"""attn_lrp (Achtibat et al. 2024) against lxt, the AttnLRP authors' package (LRP eXplains Transformers).

The reference (`benchmarks.relevance_references.lxt_attn_lrp`, shared with `saliency-server bench`) is lxt's
explicit implementation (`lxt.explicit.functional`): autograd functions whose backward pass carries relevance
itself, one function per LRP rule, composed into the timm ViT's forward pass from the model's own weights (lxt
patches Hugging Face and torchvision models, not timm's). The method under test instead modifies timm's gradients
at run time and takes input x gradient: the two meet only in the rules' definitions. lxt's explicit rules are
imported without lxt's package `__init__` where that fails (on some transformers 5 releases).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from benchmarks.relevance_references import VANISHING, lxt_attn_lrp, lxt_explicit, signed_stabilize
from service.explain.captures import CaptureBatch, ModelRunner
from service.explain.methods._attn_lrp import attn_lrp_relevance, attn_lrp_rules
from service.explain.registry import all_methods
from service.explain.targets import TargetRequest
from service.model.served import ServedModel, weight_sharing_copy
from tests.explain_helpers import explain_direct, random_pixels, served_model
from tests.helpers import TINY_VIT_KWARGS

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "tiny": ("vit_tiny_patch16_224", TINY_VIT_KWARGS),  # 4 x 4 patches of 8 px, 32 wide, 2 blocks, 2 heads
    "bigger": ("vit_tiny_patch16_224", {"img_size": 48, "patch_size": 8, "embed_dim": 64, "depth": 4,
                                        "num_heads": 4, "num_classes": 20}),  # 6 x 6 patches, 64 wide, 4 blocks
}
# Measured agreement: 3e-7 (tiny) and 5e-7 (bigger) of the largest pixel relevance at epsilon = 0, float32 rounding
# through the relevance divisions; a rule applied differently anywhere moves it by 1e-3 or more.
AGREEMENT = 1e-5


def patch_sums(maps: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, H, W) -> (B, H / patch, W / patch): each patch's sum."""
    return F.avg_pool2d(maps[:, None], patch)[:, 0] * patch * patch


def attn_lrp_maps(served: ServedModel, pixels: torch.Tensor, targets: list[int], epsilon: float,
                  **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The method's (pixel maps, token maps) through the explain pipeline, each image for its own target."""
    methods = [{"name": "attn_lrp", "params": {"epsilon": epsilon, "resolution": "pixels"}},
               {"name": "attn_lrp", "params": {"epsilon": epsilon}}]
    outcomes = explain_direct(served, pixels, methods, targets=[TargetRequest(index=t) for t in targets], **kwargs)
    return tuple(torch.stack([o.methods[m].maps[0] for o in outcomes]) for m in (0, 1))


@functools.cache
def model(name: str) -> ServedModel:
    return served_model(*MODELS[name], seed=3)


@pytest.mark.parametrize("name", list(MODELS))
def test_equals_lxt_attn_lrp_at_epsilon_zero(name: str) -> None:
    """LRP-0 on the linear layers, the rules of LayerNorm, GELU, softmax and both attention products as lxt
    defines them, with every stabiliser vanishing on both sides: the same input relevance, pixel and patch maps."""
    served = model(name)
    pixels = random_pixels(served, 4, seed=3)
    targets = [1, 4, 7, 9]
    expected, logits = lxt_attn_lrp(served.network, pixels, torch.tensor(targets), linear_epsilon=VANISHING)
    with torch.no_grad():
        torch.testing.assert_close(logits, served.network(pixels), atol=1e-5, rtol=1e-5)  # the same model
    pixel_maps, token_maps = attn_lrp_maps(served, pixels, targets, epsilon=0.0)
    expected_maps = expected.sum(dim=1)
    scale = float(expected_maps.abs().max())
    torch.testing.assert_close(pixel_maps, expected_maps, atol=AGREEMENT * scale, rtol=0)
    patch = served.network.patch_embed.patch_size[0]
    torch.testing.assert_close(token_maps, patch_sums(expected_maps, patch), atol=AGREEMENT * scale * patch, rtol=0)
    assert token_maps.shape[1:] == served.anatomy.grid_size


def test_the_epsilon_rule_equals_lxts_linear_epsilon(monkeypatch) -> None:
    """epsilon = 1e-3 on every linear layer and on the patch embedding, where the random model's activations
    (about 1e-2) make it matter (the maps move by 20% of their peak from epsilon = 0): lxt's linear_epsilon with
    the same epsilon. lxt stabilises with y + epsilon, the method (like zennit) with y + epsilon * sign(y): the
    reference is given the signed stabiliser, the only change made to lxt."""
    lf, _ = lxt_explicit()
    monkeypatch.setattr(lf, "_stabilize", signed_stabilize)
    served = model("tiny")
    pixels = random_pixels(served, 4, seed=4)
    targets = [0, 2, 5, 8]
    expected, _ = lxt_attn_lrp(served.network, pixels, torch.tensor(targets), linear_epsilon=1e-3)
    pixel_maps, _ = attn_lrp_maps(served, pixels, targets, epsilon=1e-3)
    plain, _ = attn_lrp_maps(served, pixels, targets, epsilon=0.0)
    scale = float(expected.sum(dim=1).abs().max())
    torch.testing.assert_close(pixel_maps, expected.sum(dim=1), atol=AGREEMENT * scale, rtol=0)
    assert float((plain - pixel_maps).abs().max()) > 0.05 * scale  # epsilon does matter here


def test_relevance_is_conserved_exactly_where_every_rule_is_conservative() -> None:
    """On a ViT without biases, position embedding or class token (average-pooled), whose attention output
    projections are zero, relevance passes through the patch embedding, LayerNorm, GELU, the MLPs, residual sums
    and pooling, each rule conservative: the pixels' relevance sums to the target logit. Measured: within 2e-6
    of it; the plain gradient through LayerNorm would lose nearly all of it, through GELU about 10%."""
    served = served_model("vit_tiny_patch16_224", dict(TINY_VIT_KWARGS, class_token=False, global_pool="avg"), seed=5)
    with torch.no_grad():
        for name, parameter in served.network.named_parameters():
            if name.endswith(("bias", "attn.proj.weight")) or name == "pos_embed":
                parameter.zero_()
    pixels = random_pixels(served, 4, seed=5)
    targets = [3, 1, 4, 1]
    pixel_maps, token_maps = attn_lrp_maps(served, pixels, targets, epsilon=0.0)
    with torch.no_grad():
        logits = served.network(pixels)[torch.arange(4), torch.tensor(targets)]
    assert logits.abs().min() > 1e-3
    torch.testing.assert_close(pixel_maps.sum(dim=(1, 2)), logits, rtol=1e-4, atol=0)
    torch.testing.assert_close(token_maps.sum(dim=(1, 2)), logits, rtol=1e-4, atol=0)


@functools.cache
def ground_truth_vit() -> tuple[ServedModel, torch.Tensor, torch.Tensor, np.ndarray]:
    """The committed ground-truth ViT (benchmarks/groundtruth: a trained R+ViT hybrid, GroupNorm in its stem), 8
    test images, their labels and their objects' masks."""
    from benchmarks.groundtruth.dataset import make_split
    from service.config import load_settings
    from service.http.app import load_models

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO_ROOT)
        served = load_models(load_settings(REPO_ROOT / "benchmarks" / "groundtruth" / "models.toml",
                                           device="cpu"))["gt_vit"]
    samples = make_split("test", 8)
    pixels = torch.stack([served.transform(s.image) for s in samples])
    return served, pixels, torch.tensor([s.label for s in samples]), np.stack([s.mask for s in samples])


def test_relevance_approximately_conserves_the_target_logit_on_a_trained_vit() -> None:
    """AttnLRP is approximately conservative: biases (and the position embedding, the class token) absorb their
    share, and the softmax rule keeps only sum_i R_i (x_i - E_s[x]) of the relevance reaching the attention scores.
    On the trained ground-truth ViT the pixels' relevance sums to 0.49-0.73 of the target logit (16 test images,
    mean 0.62); the expected range is 0.4-0.85. Without the 1/4 at queries and keys it exceeds the logit
    (1.0-2.3), with the plain gradient through the norms it is about 0."""
    served, pixels, labels, _ = ground_truth_vit()
    runner = ModelRunner(served.network, served.device, served.dtype, chunk_size=8)
    relevance, logits = attn_lrp_relevance(runner, pixels, labels, epsilon=1e-6)
    assert (logits > 5).all()  # confident, correct predictions
    ratios = relevance.sum(dim=(1, 2, 3)) / logits
    assert ((ratios > 0.4) & (ratios < 0.85)).all(), ratios


def test_maps_follow_the_target_class() -> None:
    """On the trained ground-truth ViT, each image explained for each of the 5 classes: the map's total follows that
    class's logit (correlation over the classes above 0.9 for every image), and the true class's map has the most
    signed relevance on the object in at least 7 of the 8 images (measured: 7; one image's true class draws its
    relevance from outside the object; chance would give about 1.6)."""
    served, pixels, labels, masks = ground_truth_vit()
    runner = ModelRunner(served.network, served.device, served.dtype, chunk_size=8)
    maps, totals, logits = [], [], []
    for c in range(len(served.labels)):
        relevance, scores = attn_lrp_relevance(runner, pixels, torch.full_like(labels, c), epsilon=1e-6)
        maps.append(relevance.sum(dim=1))
        totals.append(relevance.sum(dim=(1, 2, 3)))
        logits.append(scores)
    by_class = torch.stack(maps, dim=1)  # (B, classes, H, W)
    totals_t, logits_t = torch.stack(totals, dim=1), torch.stack(logits, dim=1)
    for i in range(pixels.shape[0]):
        correlation = np.corrcoef(totals_t[i].numpy(), logits_t[i].numpy())[0, 1]
        assert correlation > 0.9, (i, totals_t[i], logits_t[i])
    on_object = (by_class * torch.tensor(masks, dtype=torch.float32)[:, None]).sum(dim=(2, 3))  # (B, classes)
    assert int((on_object.argmax(dim=1) == labels).sum()) >= 7, (on_object, labels)


def test_batched_maps_equal_per_image_maps() -> None:
    """Three images of different targets (one with two) in one batch, in passes of 2 images: each gets the maps it
    gets alone."""
    served = model("bigger")
    pixels = random_pixels(served, 3, seed=6)
    targets = [TargetRequest(index=3), TargetRequest(top_k=2), TargetRequest(index=11)]
    methods = [{"name": "attn_lrp"}, {"name": "attn_lrp", "params": {"resolution": "pixels"}}]
    batched = explain_direct(served, pixels, methods, targets=targets, chunk_size=2)
    for i in range(3):
        (alone,) = explain_direct(served, pixels[i:i + 1], methods, targets=[targets[i]])
        assert batched[i].targets == alone.targets
        for ours, theirs in zip(batched[i].methods, alone.methods):
            assert len(ours.maps) == len(theirs.maps) == len(alone.targets)
            for a, b in zip(ours.maps, theirs.maps):
                torch.testing.assert_close(a, b, atol=1e-5 * float(b.abs().max()), rtol=1e-4)


def model_state(network: torch.nn.Module, pixels: torch.Tensor) -> dict:
    """What a method could leave changed: outputs, weights, hooks of every kind, attention switches, modes."""
    with torch.no_grad():
        logits = network(pixels)
    modules = dict(network.named_modules())
    return {
        "logits": logits,
        "weights": {k: v.clone() for k, v in network.state_dict().items()},
        "hooks": {name: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                         len(m._backward_pre_hooks)) for name, m in modules.items()},
        "fused_attn": {name: m.fused_attn for name, m in modules.items() if hasattr(m, "fused_attn")},
        "training": any(m.training for m in modules.values()),
        "requires_grad": [p.requires_grad for p in network.parameters()],
        "grads": [p.grad is None for p in network.parameters()],
    }


def assert_same_state(before: dict, after: dict) -> None:
    torch.testing.assert_close(after["logits"], before["logits"], atol=0, rtol=0)
    for key, value in before["weights"].items():
        assert torch.equal(after["weights"][key], value), key
    for key in ("hooks", "fused_attn", "training", "requires_grad", "grads"):
        assert after[key] == before[key], key


def test_the_model_is_left_unmodified() -> None:
    served = model("tiny")
    pixels = random_pixels(served, 2, seed=7)
    before = model_state(served.network, pixels)
    assert before["fused_attn"] and all(before["fused_attn"].values())  # what a plain forward pass uses
    explain_direct(served, pixels, [{"name": "attn_lrp"}, {"name": "attn_lrp", "params": {"epsilon": 0.0}}])
    assert_same_state(before, model_state(served.network, pixels))


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("where", ["forward", "backward", "target"])
def test_the_model_is_left_unmodified_after_an_exception_midway(where: str) -> None:
    """An exception with the rules installed (in the forward pass after the first block, in the backward pass, at
    the target logit) leaves the model as it was, and the next explanation is the one it gets without the
    exception."""
    served = model("tiny")
    pixels = random_pixels(served, 2, seed=8)
    network = served.network
    expected, _ = attn_lrp_maps(served, pixels, [1, 2], epsilon=1e-6)
    before = model_state(network, pixels)

    def fail_forward(_m, _i, _o):
        raise Boom("forward")

    def fail_backward(_m, _i, output):
        def hook(_grad):
            raise Boom("backward")
        output.register_hook(hook)

    handle = None
    if where != "target":
        handle = network.blocks[1].register_forward_hook(fail_forward if where == "forward" else fail_backward)
    targets = torch.tensor([1, 99 if where == "target" else 2])
    captures = CaptureBatch(logits=torch.zeros(2, 10), pixels=pixels, targets=targets,
                            runner=ModelRunner(network, served.device, served.dtype, chunk_size=8))
    method = all_methods()["attn_lrp"]
    with pytest.raises((Boom, RuntimeError, IndexError)):
        method.compute(captures, method.params_model(), served.anatomy)
    if handle is not None:
        handle.remove()
    assert_same_state(before, model_state(network, pixels))
    again, _ = attn_lrp_maps(served, pixels, [1, 2], epsilon=1e-6)
    torch.testing.assert_close(again, expected, atol=0, rtol=0)


def test_rules_on_one_lanes_copy_leave_the_other_copy_plain() -> None:
    """The server's lanes each run their own copy of the model (sharing the weights): rules installed on one copy
    do not change the gradient of the other."""
    network = model("tiny").network
    other = weight_sharing_copy(network)
    pixels = random_pixels(model("tiny"), 2, seed=9)

    def input_gradient() -> torch.Tensor:
        x = pixels.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(other(x)[:, 0].sum(), x)
        return grad

    plain = input_gradient()
    with attn_lrp_rules(network, epsilon=1e-6):
        torch.testing.assert_close(input_gradient(), plain, atol=0, rtol=0)
        x = pixels.clone().requires_grad_(True)
        (modified,) = torch.autograd.grad(network(x)[:, 0].sum(), x)
    assert not torch.allclose(modified, plain)


def std_held_constant(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The norm's formula written out, its standard deviation (root mean square) computed from a detached x."""
    held = x.detach()
    if isinstance(norm, timm.layers.GroupNormAct):  # then ReLU, whose identity rule is its gradient
        groups, held = x.reshape(x.shape[0], norm.num_groups, -1), held.reshape(x.shape[0], norm.num_groups, -1)
        spread = (held.var(-1, unbiased=False, keepdim=True) + norm.eps).sqrt()
        normalised = ((groups - groups.mean(-1, keepdim=True)) / spread).reshape(x.shape)
        return torch.relu(normalised * norm.weight[:, None, None] + norm.bias[:, None, None])
    if isinstance(norm, torch.nn.LayerNorm):
        spread = (held.var(-1, unbiased=False, keepdim=True) + norm.eps).sqrt()
        return (x - x.mean(-1, keepdim=True)) / spread * norm.weight + norm.bias
    return x / (held.square().mean(-1, keepdim=True) + norm.eps).sqrt() * norm.weight  # RMSNorm


@pytest.mark.parametrize("norm", [torch.nn.LayerNorm(6), timm.layers.RmsNorm(6),
                                  timm.layers.GroupNormAct(6, num_groups=3, act_layer=torch.nn.ReLU)],
                         ids=["layer_norm", "rms_norm", "group_norm_act"])
def test_norm_rules_are_the_gradient_with_the_standard_deviation_held_constant(norm: torch.nn.Module) -> None:
    """The identity rule on normalisations (the paper's Proposition 3.4): the gradient of the norm with its standard
    deviation held constant (the mean-centring and the affine map are linear: their gradient is kept)."""
    torch.manual_seed(10)
    with torch.no_grad():
        for parameter in norm.parameters():
            parameter.uniform_(0.5, 2.0)
    x = torch.randn(2, 6, 4, 4) if isinstance(norm, torch.nn.GroupNorm) else torch.randn(2, 5, 6)
    upstream = torch.randn_like(x)
    inputs = x.clone().requires_grad_(True)
    with attn_lrp_rules(torch.nn.Sequential(norm), epsilon=0.0):
        output = norm(inputs)
    (ours,) = torch.autograd.grad(output, inputs, upstream)
    torch.testing.assert_close(output, norm(x), atol=0, rtol=0)  # the forward values are the module's own
    inputs = x.clone().requires_grad_(True)
    written_out = std_held_constant(norm, inputs)
    torch.testing.assert_close(written_out, norm(x), atol=1e-5, rtol=1e-5)
    (expected,) = torch.autograd.grad(written_out, inputs, upstream)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    plain_inputs = x.clone().requires_grad_(True)
    (plain,) = torch.autograd.grad(norm(plain_inputs), plain_inputs, upstream)
    assert not torch.allclose(ours, plain, atol=1e-3)  # the rule is not the plain gradient


def test_models_the_rules_do_not_cover_are_refused() -> None:
    """A gated MLP (SwiGLU) multiplies two branches element-wise: its product would need the uniform rule, which
    is not installed, so the method refuses the model rather than return another method's relevance."""
    torch.manual_seed(11)
    network = timm.create_model("vit_tiny_patch16_224", pretrained=False, mlp_layer=timm.layers.SwiGLU,
                                **TINY_VIT_KWARGS).eval()
    runner = ModelRunner(network, torch.device("cpu"), torch.float32, chunk_size=8)
    with pytest.raises(ValueError, match="gated MLP"):
        attn_lrp_relevance(runner, torch.randn(1, 3, 32, 32), torch.tensor([0]), epsilon=0.0)
    assert all(not m._forward_hooks for m in network.modules())
