"""Stage 2, recovery: peft LoRA on the attention projections with next-token loss (ce), distillation from the
teacher's logits (kd) or both (ce+kd).

The KD teacher is the same model with LoRA disabled and attention in teacher mode: no second copy in memory.
"""

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from ..modeling.modeling_lincat import set_attention_mode
from .transfer import attention_parameters


def add_lora(model, cfg):
    """Wrap `model` with LoRA adapters per the stage-2 config; returns (peft_model, trainable params by name)."""
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    targets = list(cfg.target_modules)
    if "qkv_proj" in names and not {"q_proj", "k_proj", "v_proj"} & names:  # Phi-3 fuses q/k/v
        targets = ["qkv_proj" if t in ("q_proj", "k_proj", "v_proj") else t for t in targets]
        targets = list(dict.fromkeys(targets))
    missing = [t for t in targets if t not in names]
    if missing:
        raise ValueError(f"stage2.target_modules {missing} are not modules of this model (it has e.g. q_proj, o_proj)")
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    attn = attention_parameters(model)
    peft_model = get_peft_model(model, lora)
    for p in attn.values():  # peft froze everything but LoRA; optionally keep training the feature maps
        p.requires_grad_(cfg.train_attention)
    params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    return peft_model, params


def _ce(logits, batch):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())


def _kd(student_logits, teacher_logits, temperature):
    t = temperature
    s = F.log_softmax(student_logits[:, :-1].float() / t, dim=-1)
    p = F.log_softmax(teacher_logits[:, :-1].float() / t, dim=-1)
    return F.kl_div(s.flatten(0, 1), p.flatten(0, 1), log_target=True, reduction="batchmean") * t * t


def teacher_logits(peft_model, batch):
    """The original softmax model's logits: LoRA off, attention in teacher mode, same weights in memory."""
    set_attention_mode(peft_model, "teacher")
    try:
        with torch.no_grad(), peft_model.disable_adapter():
            return peft_model(input_ids=batch, use_cache=False).logits
    finally:
        set_attention_mode(peft_model, "student")


def recovery_loss(peft_model, batch, cfg):
    metrics = {}
    teacher = teacher_logits(peft_model, batch) if "kd" in cfg.loss else None
    logits = peft_model(input_ids=batch, use_cache=False).logits
    ce = _ce(logits, batch)
    metrics["ce"] = ce.item()
    if teacher is None:
        return ce, metrics
    kd = _kd(logits, teacher, cfg.kd_temperature)
    metrics["kd"] = kd.item()
    if cfg.loss == "kd":
        return kd, metrics
    return (1 - cfg.kd_weight) * ce + cfg.kd_weight * kd, metrics


@torch.no_grad()
def eval_ce(model, batch):
    return _ce(model(input_ids=batch, use_cache=False).logits, batch)
