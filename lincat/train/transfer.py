"""Stage 1, attention transfer: train only the new attention parameters (feature maps, window factors) so that each
layer's output matches the frozen softmax teacher of the same weights.

Teacher-forced: every lincat layer runs in "transfer" mode, which passes the teacher's output on to the next layer
and records the student's MSE to it, so all layers train in one forward pass. The teacher runs through SDPA.
"""

import torch

from ..modeling.modeling_lincat import lincat_modules, set_attention_mode


def attention_parameters(model) -> dict:
    """The parameters lincat added (feature maps, window factors), by name."""
    names = {id(p) for m in lincat_modules(model) for n, p in m.named_parameters() if "feature_map" in n or "window_factor" in n}
    return {n: p for n, p in model.named_parameters() if id(p) in names}


def freeze_all_but(model, params: dict):
    keep = {id(p) for p in params.values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def transfer_loss(model, batch: torch.Tensor):
    """Sum over layers of the student-teacher MSE of attention outputs (before o_proj)."""
    set_attention_mode(model, "transfer")
    try:
        # The LM head is not needed: run the decoder stack only.
        model.get_decoder()(input_ids=batch, use_cache=False)
        losses = [m.transfer_loss for m in lincat_modules(model) if m.transfer_loss is not None]
    finally:
        set_attention_mode(model, "student")
    total = torch.stack(losses).sum()
    return total, {"mse_per_layer": total.item() / len(losses)}
