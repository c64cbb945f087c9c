"""Independent references for the relevance-propagation methods, shared by their tests and by `bench`:

- `lxt_attn_lrp`: AttnLRP (Achtibat et al. 2024) composed from lxt's explicit rules (`lxt.explicit.functional`, the
  AttnLRP authors' package) into a timm ViT's forward pass, for `attn_lrp` (tests/test_explain_attn_lrp.py);
- `chefer_map` / `chefer_maps`: transformer attribution (Chefer, Gur & Wolf 2021) as a per-image port of the
  authors' `relprop` code, for `transformer_attribution` (tests/test_explain_transformer_attribution.py);
- `zennit_lrp_maps`: zennit's own Gradient attributor with a composite, for `lrp` (tests/test_explain_lrp.py has
  its own copy).

Each shares nothing with the method it checks but the rules' definitions.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

# --- AttnLRP through lxt's explicit rules ----------------------------------------------------------------------------
#
# The reference is lxt's explicit implementation (`lxt.explicit.functional`): autograd functions whose backward pass
# carries relevance itself, one function per LRP rule (linear_epsilon, layer_norm, softmax, matmul, add2, mul2,
# `lxt.explicit.rules.identity`), composed below into the timm ViT's forward pass from the model's own weights (lxt
# patches Hugging Face and torchvision models, not timm's). The `attn_lrp` method instead modifies timm's gradients
# at run time and takes input x gradient: the two meet only in the rules' definitions.
#
# lxt 2.1's package `__init__` imports its Hugging Face model patches, which fail on some transformers 5 releases
# (`transformers.modeling_attn_mask_utils` is gone); the explicit rules import only torch, so they are imported
# without running that `__init__` when it fails (`lxt_explicit`).

VANISHING = 1e-30  # a stabiliser of lxt's non-linear rules that vanishes (representable in float32)


def lxt_explicit() -> tuple[types.ModuleType, types.ModuleType]:
    """(lxt.explicit.functional, lxt.explicit.rules), imported without running lxt's package `__init__` when that
    fails (see above). ImportError (name "lxt") when lxt is not installed."""
    try:
        functional = importlib.import_module("lxt.explicit.functional")
    except ImportError:
        spec = importlib.util.find_spec("lxt") if "lxt" not in sys.modules else None
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("lxt is not installed (pip install -e '.[bench]' or '.[test]')", name="lxt") from None
        package = types.ModuleType("lxt")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["lxt"] = package
        functional = importlib.import_module("lxt.explicit.functional")
    return functional, importlib.import_module("lxt.explicit.rules")


def signed_stabilize(values: torch.Tensor, epsilon: float = 1e-6, inplace: bool = False) -> torch.Tensor:
    """lxt's `_stabilize` with the sign: values + epsilon * sign(values), sign(0) = 1 (lxt adds +epsilon)."""
    return values + torch.where(values >= 0, epsilon, -epsilon)


@contextmanager
def signed_lxt_stabiliser() -> Iterator[None]:
    """lxt's functional rules stabilised with the sign (`signed_stabilize`, as zennit and `attn_lrp` do) while
    active: the only change made to lxt, for comparisons at epsilon > 0."""
    lf, _ = lxt_explicit()
    original = lf._stabilize
    lf._stabilize = signed_stabilize
    try:
        yield
    finally:
        lf._stabilize = original


def lxt_attn_lrp(model: torch.nn.Module, pixels: torch.Tensor, targets: torch.Tensor, linear_epsilon: float,
                 other_epsilon: float = VANISHING, copy_model: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """lxt's AttnLRP input relevance (B, C, H, W) of each image's target logit, and the logits, for a timm ViT with
    a class token, learned position embeddings and the standard blocks: the patch embedding and every linear layer
    through lf.linear_epsilon (`linear_epsilon`), LayerNorm through lf.layer_norm's function, residual additions
    and the position embedding through lf.add2, the scaled query-key and attention-value products through lf.matmul,
    softmax through lf.softmax, GELU through the identity rule (`other_epsilon` stabilises the non-linear rules).
    Relevance starts as the target logit (one-hot x logits) and comes back at the pixels. The weights must not
    require gradients (they are constants of the relevance flow): `copy_model` runs on a copy with them switched
    off; without it the caller's model must already be so."""
    lf, lr = lxt_explicit()
    if copy_model:
        model = copy.deepcopy(model).requires_grad_(False)
    assert model.global_pool == "token" and not model.no_embed_class and model.num_prefix_tokens == 1
    assert all(isinstance(m, torch.nn.Identity) for m in (model.norm_pre, model.fc_norm, model.patch_embed.norm))
    x = pixels.clone().requires_grad_(True)
    batch = x.shape[0]
    proj = model.patch_embed.proj  # a convolution with stride = kernel: a linear layer on each patch
    patches = F.unfold(x, kernel_size=proj.kernel_size, stride=proj.stride).transpose(1, 2)
    tokens = lf.linear_epsilon(patches, proj.weight.flatten(1), proj.bias, linear_epsilon)
    tokens = torch.cat([model.cls_token.expand(batch, -1, -1), tokens], dim=1)
    tokens = lf.add2(tokens, model.pos_embed.expand(batch, -1, -1), False, other_epsilon)
    n, width = tokens.shape[1:]

    def layer_norm(values: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
        return lf.layer_norm_grad_fn.apply(values, norm.weight, norm.bias, norm.eps, other_epsilon)

    for block in model.blocks:
        assert all(isinstance(m, torch.nn.Identity) for m in (block.ls1, block.ls2, block.attn.q_norm,
                                                              block.attn.norm, block.mlp.norm))
        attn, mlp = block.attn, block.mlp
        qkv = lf.linear_epsilon(layer_norm(tokens, block.norm1), attn.qkv.weight, attn.qkv.bias, linear_epsilon)
        q, k, v = qkv.reshape(batch, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q = lf.mul2(q, attn.scale)  # times a constant: all of the relevance to q
        probabilities = lf.softmax(lf.matmul(q, k.transpose(-2, -1), False, other_epsilon), -1)
        heads = lf.matmul(probabilities, v, False, other_epsilon).transpose(1, 2).reshape(batch, n, width)
        out = lf.linear_epsilon(heads, attn.proj.weight, attn.proj.bias, linear_epsilon)
        tokens = lf.add2(tokens, out, False, other_epsilon)
        hidden = lf.linear_epsilon(layer_norm(tokens, block.norm2), mlp.fc1.weight, mlp.fc1.bias, linear_epsilon)
        hidden = lr.identity(mlp.act, hidden)
        out = lf.linear_epsilon(hidden, mlp.fc2.weight, mlp.fc2.bias, linear_epsilon)
        tokens = lf.add2(tokens, out, False, other_epsilon)
    tokens = layer_norm(tokens, model.norm)
    logits = lf.linear_epsilon(tokens[:, 0], model.head.weight, model.head.bias, linear_epsilon)
    (relevance,) = torch.autograd.grad(logits, x, F.one_hot(targets, logits.shape[1]) * logits.detach())
    return relevance, logits.detach()


# --- Transformer attribution: the authors' relprop rules (batch of one image) ----------------------------------------
#
# An explicit forward pass through the ViT's blocks, then the authors' relevance propagation written out layer by
# layer as their `relprop` methods compute it (github.com/hila-chefer/Transformer-Explainability,
# modules/layers_ours.py, baselines/ViT/ViT_LRP.py), the attention gradients by autograd, and their rollout. The tests
# run it in float64; `bench` in float32 (the authors' precision).

def safe_divide(a, b):
    den = b.clamp(min=1e-9) + b.clamp(max=1e-9)
    den = den + den.eq(0).type(den.type()) * 1e-9
    return a / den * b.ne(0).type(b.type())


def gradprop(outputs, inputs, grad_outputs):
    return torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=True)


def leaf(x):
    return x.detach().clone().requires_grad_(True)


def linear_relprop(r, x, weight, alpha=1.0):
    """layers_ours.Linear.relprop."""
    beta = alpha - 1
    pw, nw = torch.clamp(weight, min=0), torch.clamp(weight, max=0)
    px, nx = leaf(torch.clamp(x, min=0)), leaf(torch.clamp(x, max=0))

    def f(w1, w2, x1, x2):
        z1, z2 = F.linear(x1, w1), F.linear(x2, w2)
        s1, s2 = safe_divide(r, z1 + z2), safe_divide(r, z1 + z2)
        return x1 * torch.autograd.grad(z1, x1, s1)[0] + x2 * torch.autograd.grad(z2, x2, s2)[0]

    return (alpha * f(pw, nw, px, nx) - beta * f(nw, pw, px, nx)).detach()


def simple_relprop(forward, r, *xs):
    """layers_ours.RelPropSimple.relprop (einsum, IndexSelect)."""
    xs = [leaf(x) for x in xs]
    z = forward(*xs)
    c = gradprop(z, xs, safe_divide(r, z))
    return [(x * g).detach() for x, g in zip(xs, c)]


def add_relprop(r, x0, x1):
    """layers_ours.Add.relprop."""
    a, b = simple_relprop(torch.add, r, x0, x1)
    a_sum, b_sum = a.sum(), b.sum()
    a_fact = safe_divide(a_sum.abs(), a_sum.abs() + b_sum.abs()) * r.sum()
    b_fact = safe_divide(b_sum.abs(), a_sum.abs() + b_sum.abs()) * r.sum()
    return a * safe_divide(a_fact, a.sum()), b * safe_divide(b_fact, b.sum())


def clone_relprop(rs, x):
    """layers_ours.Clone.relprop."""
    x = leaf(x)
    c = gradprop([x] * len(rs), x, [safe_divide(r, x) for r in rs])[0]
    return (x * c).detach()


def explicit_forward(model, pixels, check: bool = True):
    """The model block by block with explicit attention, keeping every tensor the rules read (in the model's dtype).
    LayerScale (the DINOv2 variant) and q/k norms are applied as the model does; the rules pass them unchanged.
    `check`: assert that the logits are the model's own (one more forward pass)."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(pixels))))
    blocks = []
    for block in model.blocks:
        attn, t = block.attn, {}
        b, n, c = x.shape
        t["x_in"] = x
        t["h1"] = block.norm1(x)
        qkv = attn.qkv(t["h1"]).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        t["q"], t["k"], t["v"] = attn.q_norm(qkv[0]), attn.k_norm(qkv[1]), qkv[2]
        t["attn"] = ((t["q"] @ t["k"].transpose(-2, -1)) * attn.scale).softmax(dim=-1)
        t["proj_in"] = (t["attn"] @ t["v"]).transpose(1, 2).reshape(b, n, c)
        t["b1"] = block.ls1(attn.proj(t["proj_in"]))
        t["x_mid"] = x + t["b1"]
        t["h2"] = block.norm2(t["x_mid"])
        t["act"] = block.mlp.act(block.mlp.fc1(t["h2"]))
        t["b2"] = block.ls2(block.mlp.fc2(t["act"]))
        x = t["x_mid"] + t["b2"]
        blocks.append(t)
    normed = model.norm(x)
    logits = model.head(normed[:, 0])  # class-token pooling, no fc_norm in these variants
    if check:
        with torch.no_grad():
            torch.testing.assert_close(logits, model(pixels))  # the re-implementation is the model
    return logits, normed, blocks


def block_relprop(model, index, t, cam):
    """ViT_LRP.Block.relprop with Mlp.relprop and Attention.relprop inlined; returns (cam, attention cam)."""
    block, attn = model.blocks[index], model.blocks[index].attn
    cam1, cam2 = add_relprop(cam, t["x_mid"], t["b2"])
    cam2 = linear_relprop(cam2, t["act"], block.mlp.fc2.weight)  # fc2 (ls2: identity)
    cam2 = linear_relprop(cam2, t["h2"], block.mlp.fc1.weight)  # GELU, dropout: identity
    cam = clone_relprop([cam1, cam2], t["x_mid"])  # norm2: identity
    cam1, cam2 = add_relprop(cam, t["x_in"], t["b1"])
    cam2 = linear_relprop(cam2, t["proj_in"], attn.proj.weight)
    b, n, _ = cam2.shape
    cam2 = cam2.reshape(b, n, attn.num_heads, attn.head_dim).transpose(1, 2)  # 'b n (h d) -> b h n d'
    cam_attn, cam_v = simple_relprop(lambda a, v: torch.einsum("bhij,bhjd->bhid", a, v), cam2, t["attn"], t["v"])
    cam_attn, cam_v = cam_attn / 2, cam_v / 2
    cam_q, cam_k = simple_relprop(lambda q, k: torch.einsum("bhid,bhjd->bhij", q, k), cam_attn, t["q"], t["k"])
    cam_q, cam_k = cam_q / 2, cam_k / 2  # softmax, attn_drop: identity
    cam_qkv = torch.stack([cam_q, cam_k, cam_v]).permute(1, 3, 0, 2, 4).reshape(b, n, -1)
    cam2 = linear_relprop(cam_qkv, t["h1"], attn.qkv.weight)
    return clone_relprop([cam1, cam2], t["x_in"]), cam_attn  # norm1: identity


def chefer_relprop(model, pixels, target, start_layer, check: bool = True):
    """One image (1, C, H, W) through `model` (used as it is, in its dtype):
    ViT_LRP.VisionTransformer.relprop(method="transformer_attribution") from a one-hot, and
    compute_rollout_attention (eye added, no normalisation), class-token row over the patches; and every block's
    attention relevance (blocks, heads, N, N)."""
    with torch.enable_grad():
        dtype = next(model.parameters()).dtype
        logits, normed, blocks = explicit_forward(model, leaf(pixels.to(dtype)), check=check)
        attention_grads = torch.autograd.grad(logits[0, target], [t["attn"] for t in blocks])
        one_hot = torch.zeros_like(logits)
        one_hot[0, target] = 1.0
        cam = linear_relprop(one_hot, normed[:, 0], model.head.weight)
        (cam,) = simple_relprop(lambda x: x[:, 0], cam, normed)  # IndexSelect of the class token; norm: identity
        cams = [None] * len(blocks)
        for index in reversed(range(len(blocks))):
            cam, cams[index] = block_relprop(model, index, blocks[index], cam)
    layers = []
    for grad, attn_cam in zip(attention_grads, cams):
        layers.append((grad[0] * attn_cam[0]).clamp(min=0).mean(dim=0))
    n = layers[0].shape[-1]
    matrices = [layer + torch.eye(n, dtype=layer.dtype, device=layer.device) for layer in layers]
    joint = matrices[start_layer]
    for matrix in matrices[start_layer + 1:]:
        joint = matrix @ joint
    return joint[0, model.num_prefix_tokens:], torch.stack([c[0] for c in cams])


def chefer_map(network, pixels, target, start_layer, dtype: torch.dtype = torch.float64):
    """`chefer_relprop` on a copy of `network` in `dtype` (float64 in the tests)."""
    model = copy.deepcopy(network).to(dtype)
    return chefer_relprop(model, pixels, target, start_layer)


def chefer_maps(model, pixels: torch.Tensor, targets: list[int], start_layer: int, grid: tuple[int, int],
                ) -> torch.Tensor:
    """(B, rows, cols): the reference's maps one image at a time, as the authors' code runs (`model` used as it is,
    without the logits check)."""
    return torch.stack([
        chefer_relprop(model, pixels[i:i + 1], target, start_layer, check=False)[0].reshape(grid)
        for i, target in enumerate(targets)
    ])


# --- LRP for CNNs through zennit -------------------------------------------------------------------------------------


def zennit_lrp_maps(model: torch.nn.Module, composite, pixels: torch.Tensor, targets: list[int]) -> torch.Tensor:
    """zennit's Gradient attributor with `composite` on `model` (canonized in place for the call: pass a copy), the
    target logit as output relevance, summed over the colour channels: (B, H, W)."""
    from zennit.attribution import Gradient

    def output_relevance(output: torch.Tensor) -> torch.Tensor:
        one_hot = torch.zeros_like(output)
        one_hot[torch.arange(len(targets)), torch.tensor(targets)] = 1.0
        return one_hot * output.detach()

    with Gradient(model, composite) as attributor:
        _, relevance = attributor(pixels.clone().requires_grad_(True), output_relevance)
    return relevance.sum(dim=1)
