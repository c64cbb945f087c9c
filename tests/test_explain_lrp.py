"""`lrp` (CNN LRP through zennit) against zennit called directly, a hand-computed epsilon rule, zennit's own ResNet
canonizer, relevance conservation, batching and chunking, and the served network left as it was."""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import (
    EpsilonAlpha2Beta1,
    EpsilonGammaBox,
    EpsilonPlus,
    EpsilonPlusFlat,
    LayerMapComposite,
    layer_map_base,
)
from zennit.rules import AlphaBeta, Epsilon
from zennit.torchvision import ResNetCanonizer
from zennit.types import Linear as LinearOrConvolution

from benchmarks.relevance_references import zennit_lrp_maps
from service.explain.captures import CaptureBatch, ModelRunner
from service.explain.methods._lrp import AdditionCanonizer, forget_network, lrp_network
from service.explain.registry import all_methods
from service.explain.targets import TargetRequest
from tests.explain_helpers import explain_direct, random_pixels, served_model, stack_maps

TARGETS = [3, 7, 1]
COMPOSITES = ["epsilon_plus_flat", "zplus", "epsilon_alpha2_beta1", "epsilon_gamma_box", "alpha1_beta0", "epsilon"]
LRP = all_methods()["lrp"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@functools.cache
def tiny_cnn():
    served = served_model("test_resnet", {"num_classes": 10}, seed=0, size=64)
    randomise_batch_norms(served.network, seed=0)
    return served


@functools.cache
def timm_resnet():
    served = served_model("resnet10t", {"num_classes": 10}, seed=1, size=64)
    randomise_batch_norms(served.network, seed=1)
    return served


def randomise_batch_norms(network: nn.Module, seed: int) -> None:
    """Running statistics and affine parameters away from their initial values (a random network's batch norms are
    otherwise identities, and merging them would be tested on nothing; timm also zeroes the scale of each residual
    block's last batch norm, which would leave every residual branch at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, nn.BatchNorm2d):
                channels = module.num_features
                module.running_mean.copy_(0.1 * torch.randn(channels, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(channels, generator=generator))
                module.weight.copy_(0.5 + torch.rand(channels, generator=generator))
                module.bias.copy_(0.1 * torch.randn(channels, generator=generator))


def zennit_composite(name: str, served, epsilon: float = 1e-6):
    """The composite as zennit's own classes build it, with the method's canonizers."""
    canonizers = [SequentialMergeBatchNorm(), AdditionCanonizer()]
    if name == "epsilon_plus_flat":
        return EpsilonPlusFlat(epsilon=epsilon, canonizers=canonizers)
    if name == "zplus":
        return EpsilonPlus(epsilon=epsilon, canonizers=canonizers)
    if name == "epsilon_alpha2_beta1":
        return EpsilonAlpha2Beta1(epsilon=epsilon, canonizers=canonizers)
    if name == "epsilon_gamma_box":
        mean = torch.tensor(served.data_config["mean"]).view(1, 3, 1, 1)
        std = torch.tensor(served.data_config["std"]).view(1, 3, 1, 1)
        return EpsilonGammaBox(low=-mean / std, high=(1 - mean) / std, epsilon=epsilon, canonizers=canonizers)
    rule = AlphaBeta(alpha=1, beta=0) if name == "alpha1_beta0" else Epsilon(epsilon=epsilon)
    return LayerMapComposite(layer_map=layer_map_base() + [(LinearOrConvolution, rule)], canonizers=canonizers)


def zennit_maps(network: nn.Module, composite, pixels: torch.Tensor, targets: list[int]) -> torch.Tensor:
    """zennit's Gradient attributor with the target logit as output relevance, summed over channels, on a copy of the
    network (zennit merges batch norms into the weights: never on the served network)."""
    return zennit_lrp_maps(lrp_network(network), composite, pixels, targets)


def method_maps(served, pixels: torch.Tensor, targets: list[int], **params) -> torch.Tensor:
    outcomes = explain_direct(served, pixels, [{"name": "lrp", "params": params}],
                              targets=[TargetRequest(index=t) for t in targets])
    return stack_maps(outcomes)


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    scale = float(expected.abs().max())
    assert scale > 0
    torch.testing.assert_close(actual, expected, rtol=0, atol=rtol * scale)


@pytest.mark.parametrize("composite", COMPOSITES)
def test_matches_zennit_called_directly_on_the_tiny_cnn(composite: str) -> None:
    served = tiny_cnn()
    pixels = random_pixels(served, 3, seed=1)
    expected = zennit_maps(served.network, zennit_composite(composite, served), pixels, TARGETS)
    assert_close_to_scale(method_maps(served, pixels, TARGETS, composite=composite), expected, 1e-6)  # measured: 0


@pytest.mark.parametrize("composite", ["epsilon_plus_flat", "epsilon_alpha2_beta1"])
def test_matches_zennit_called_directly_on_a_timm_resnet(composite: str) -> None:
    served = timm_resnet()
    pixels = random_pixels(served, 2, seed=2)
    expected = zennit_maps(served.network, zennit_composite(composite, served, epsilon=0.1), pixels, TARGETS[:2])
    got = method_maps(served, pixels, TARGETS[:2], composite=composite, epsilon=0.1)
    assert_close_to_scale(got, expected, 1e-6)  # measured: 0


def test_the_addition_canonizer_equals_zennits_resnet_canonizer_on_torchvision() -> None:
    """torchvision's ResNet blocks are the ones zennit's ResNetCanonizer rewrites (a `Sum` module under the Norm
    rule); the generic addition canonizer must give the same relevance, bit for bit, without rewriting them."""
    torch.manual_seed(0)
    network = torchvision.models.resnet18(num_classes=10).eval().requires_grad_(False)
    randomise_batch_norms(network, seed=2)
    pixels = torch.randn(2, 3, 32, 32)
    targets = [4, 9]
    theirs = zennit_maps(network, EpsilonPlusFlat(canonizers=[ResNetCanonizer()]), pixels, targets)
    ours = zennit_maps(network, EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm(), AdditionCanonizer()]),
                       pixels, targets)
    plain = zennit_maps(network, EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm()]), pixels, targets)
    assert torch.equal(ours, theirs)
    assert not torch.allclose(plain, theirs, rtol=1e-2)  # without it, both terms of a sum get all its relevance


class Dense(nn.Module):
    """Linear-ReLU-Linear on a (B, 3, 2, 2) input flattened: small enough to compute LRP by hand."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(5)
        self.flatten = nn.Flatten()
        self.fc1, self.act, self.fc2 = nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 4)
        with torch.no_grad():
            for layer in (self.fc1, self.fc2):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator))
                layer.bias.copy_(0.5 * torch.randn(layer.bias.shape, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.flatten(x))))


def stabilised(z: np.ndarray, epsilon: float) -> np.ndarray:
    """zennit's stabiliser: epsilon added with the sign of z (0 counted positive)."""
    return z + epsilon * np.where(z >= 0, 1.0, -1.0)


def hand_lrp(network: Dense, pixels: torch.Tensor, targets: list[int], epsilon: float, flat_first: bool):
    """The epsilon rule written out for one image at a time: R_in_i = sum_j x_i w_ji R_j / (z_j +- eps); the ReLU
    passes relevance on; with `flat_first`, the first layer's relevance R_j is spread evenly over the 12 inputs
    (the flat rule: all weights 1, no bias, so each input gets R_j / (12 +- stabiliser))."""
    w1, b1 = network.fc1.weight.double().numpy(), network.fc1.bias.double().numpy()
    w2, b2 = network.fc2.weight.double().numpy(), network.fc2.bias.double().numpy()
    maps = []
    for image, target in zip(pixels.double().numpy(), targets):
        x = image.reshape(-1)
        z1 = w1 @ x + b1
        a1 = np.maximum(z1, 0.0)
        z2 = w2 @ a1 + b2
        r2 = np.zeros_like(z2)
        r2[target] = z2[target]  # the target logit
        r1 = np.array([sum(a1[j] * w2[k, j] * r2[k] / stabilised(z2[k], epsilon) for k in range(4))
                       for j in range(6)])
        if flat_first:
            r0 = np.array([sum(r1[j] / stabilised(12.0, 1e-6) for j in range(6)) for _ in range(12)])
        else:
            r0 = np.array([sum(x[i] * w1[j, i] * r1[j] / stabilised(z1[j], epsilon) for j in range(6))
                           for i in range(12)])
        maps.append(r0.reshape(3, 2, 2).sum(axis=0))
    return torch.tensor(np.stack(maps), dtype=torch.float32)


@pytest.mark.parametrize(("composite", "flat_first"), [("epsilon", False), ("epsilon_plus_flat", True)])
@pytest.mark.parametrize("epsilon", [1e-6, 0.5])
def test_a_hand_computed_epsilon_rule_on_a_dense_network(composite: str, flat_first: bool, epsilon: float) -> None:
    network = Dense().eval().requires_grad_(False)
    pixels = torch.randn(3, 3, 2, 2, generator=torch.Generator().manual_seed(6))
    targets = torch.tensor([0, 2, 3])
    captures = CaptureBatch(logits=network(pixels), pixels=pixels, targets=targets,
                            runner=ModelRunner(network, torch.device("cpu"), torch.float32, chunk_size=8))
    got = LRP.compute(captures, LRP.params_model(composite=composite, epsilon=epsilon), None).maps
    expected = hand_lrp(network, pixels, targets.tolist(), epsilon, flat_first)
    assert expected.abs().max() > 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def bias_free(served) -> None:
    """Every bias of the tiny CNN zero after canonization: batch norms with zero mean and shift, a bias-free head."""
    with torch.no_grad():
        for module in served.network.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.zero_()
                module.bias.zero_()
        served.network.fc.bias.zero_()


# |sum of the input relevance - target logit| / |target logit| on the bias-free tiny CNN: every composite's rules are
# conservative there (epsilon 1e-9); what is lost is the stabilisers' share (1e-6 added to each denominator of the
# other rules and of the poolings' and additions' Norm rule) and float32 rounding. Measured: 4.6e-5 to 5.4e-5 for
# every composite.
CONSERVATION_RTOL = 2e-4


@pytest.mark.parametrize("composite", COMPOSITES)
def test_relevance_is_conserved_without_biases(composite: str) -> None:
    served = served_model("test_resnet", {"num_classes": 10}, seed=3, size=64)
    randomise_batch_norms(served.network, seed=3)
    bias_free(served)
    pixels = random_pixels(served, 3, seed=4)
    logits = served.network(pixels)
    scores = logits[torch.arange(3), torch.tensor(TARGETS)]
    totals = method_maps(served, pixels, TARGETS, composite=composite, epsilon=1e-9).sum(dim=(1, 2))
    gap = ((totals - scores).abs() / scores.abs()).max()
    assert gap < CONSERVATION_RTOL, (composite, float(gap))


def test_biases_absorb_relevance() -> None:
    """The same network with its biases: the sum no longer equals the logit (so the test above tests something)."""
    served = tiny_cnn()
    pixels = random_pixels(served, 3, seed=4)
    scores = served.network(pixels)[torch.arange(3), torch.tensor(TARGETS)]
    totals = method_maps(served, pixels, TARGETS, composite="epsilon", epsilon=1e-9).sum(dim=(1, 2))
    assert ((totals - scores).abs() / scores.abs()).max() > 1e-2


def test_batched_and_chunked_maps_equal_per_image_maps() -> None:
    served = tiny_cnn()
    pixels = random_pixels(served, 3, seed=7)
    targets = [TargetRequest(index=t) for t in TARGETS]
    batched = stack_maps(explain_direct(served, pixels, ["lrp"], targets=targets, chunk_size=2))
    for i in range(3):
        alone = stack_maps(explain_direct(served, pixels[i:i + 1], ["lrp"], targets=targets[i:i + 1]))
        assert_close_to_scale(batched[i:i + 1], alone, 1e-5)


def test_different_targets_give_different_maps() -> None:
    served = tiny_cnn()
    pixels = random_pixels(served, 1, seed=8)
    first, other = (method_maps(served, pixels, [t]) for t in (2, 5))
    assert not torch.allclose(first, other, atol=1e-3 * float(first.abs().max()))


def network_state(network: nn.Module) -> dict:
    """Everything LRP could leave behind: hooks, instance attributes shadowing methods, the weight tensors (objects,
    storage and values)."""
    return {
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                     for m in network.modules()),
        "forward_overrides": [name for name, m in network.named_modules() if "forward" in vars(m)],
        "tensors": [(name, id(t), t.data_ptr(), t.clone()) for name, t in
                    list(network.named_parameters()) + list(network.named_buffers())],
    }


def assert_same_state(before: dict, after: dict) -> None:
    assert after["hooks"] == before["hooks"] == 0
    assert after["forward_overrides"] == before["forward_overrides"] == []
    for (name, *old), (_, *new) in zip(before["tensors"], after["tensors"], strict=True):
        assert old[:2] == new[:2], name
        assert torch.equal(old[2], new[2]), name


def test_the_served_network_is_left_as_it_was_even_when_the_pass_fails(monkeypatch) -> None:
    served = served_model("test_resnet", {"num_classes": 10}, seed=4, size=64)
    randomise_batch_norms(served.network, seed=4)
    served.make_copies(2)  # lanes share their parameter objects: a merge into them would reach the other lane
    pixels = random_pixels(served, 2, seed=9)
    before = network_state(served.network)
    reference = method_maps(served, pixels, TARGETS[:2], composite="epsilon_gamma_box")
    assert_same_state(before, network_state(served.network))

    import service.explain.methods._lrp as lrp_module

    def failing(*args, **kwargs):
        raise RuntimeError("backward failed")

    monkeypatch.setattr(lrp_module.torch.autograd, "grad", failing)
    with pytest.raises(RuntimeError, match="backward failed"):
        method_maps(served, pixels, TARGETS[:2], composite="epsilon_gamma_box")
    monkeypatch.undo()
    assert_same_state(before, network_state(served.network))
    torch.testing.assert_close(method_maps(served, pixels, TARGETS[:2], composite="epsilon_gamma_box"), reference)


def test_a_kept_copy_follows_weights_replaced_or_updated_in_place() -> None:
    """The copy LRP runs on is kept per network: it must see new weight tensors (made again) and in-place updates
    (shared storage), as the evaluate command's cascading re-initialisation makes them."""
    served = served_model("test_resnet", {"num_classes": 10}, seed=5, size=64)
    randomise_batch_norms(served.network, seed=5)  # timm zeroes each block's last batch-norm scale
    pixels = random_pixels(served, 1, seed=10)
    first = method_maps(served, pixels, [1])
    served.network.fc.weight = nn.Parameter(2.0 * served.network.fc.weight.detach(), requires_grad=False)
    served.network.fc.bias = nn.Parameter(2.0 * served.network.fc.bias.detach(), requires_grad=False)
    # the target logit doubles and so does every relevance (the epsilon rule's ratios are unchanged)
    torch.testing.assert_close(method_maps(served, pixels, [1]), 2.0 * first, rtol=1e-4, atol=1e-7)
    with torch.no_grad():
        served.network.fc.weight.mul_(0.5)
        served.network.fc.bias.mul_(0.5)
        served.network.layer4[0].bn2.running_var.mul_(4.0)  # merged into conv2 at every pass
    updated = method_maps(served, pixels, [1])
    forget_network(served.network)
    torch.testing.assert_close(updated, method_maps(served, pixels, [1]))
    assert not torch.allclose(updated, first, rtol=1e-3)


def test_half_precision_models_run_in_float32() -> None:
    served = tiny_cnn()
    pixels = random_pixels(served, 2, seed=11)
    expected = zennit_maps(served.network, zennit_composite("epsilon_plus_flat", served), pixels, TARGETS[:2])
    half = copy.deepcopy(served.network).to(torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in lrp_network(half).parameters())
    got = zennit_maps(half, zennit_composite("epsilon_plus_flat", served), pixels, TARGETS[:2])
    # bfloat16 weights (8 bits of mantissa) change the map by a few percent, not its sign or shape
    assert float((got - expected).norm() / expected.norm()) < 0.1
