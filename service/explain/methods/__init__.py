"""One module per explanation method; each registers itself with `service.explain.registry.register_method`.

This import list is the list of methods: `registry.all_methods()` imports this package, so a method module that is
not listed here is never registered (tests/test_method_contract.py fails for a public module missing from it).
Private `_*.py` modules hold what several methods share; they register nothing.
"""

from service.explain.methods import (  # noqa: F401  (imported for their registrations)
    attention_flow,
    attention_layers,
    attn_lrp,
    auto,
    cam,
    gae,
    grad_rollout,
    gradcam,
    gradcam_pp,
    input_x_gradient,
    integrated_gradients,
    layercam,
    lrp,
    norm_attention,
    raw_attention,
    rollout,
    saliency,
    smoothgrad,
    transformer_attribution,
    value_zeroing,
    vit_cx,
)
