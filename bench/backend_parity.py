"""Backend parity on one GPU: a 2-layer Llama (hidden 1024, 8 query / 2 KV heads, head_dim 128, random weights,
bf16) converted to lolcats and to hedgehog, then the attention-transfer loss of 2 x 2048 random tokens and every
parameter's gradient, once with the PyTorch forms (backend "torch") and once with the Triton kernels ("triton":
feature maps, chunked attention). Prints one JSON line per kind: both losses and the worst relative gradient
difference (bf16 arithmetic on both sides: expect about 1e-2 at most).

    python bench/backend_parity.py
"""

import json

import _paths  # noqa: F401  (repository root on sys.path, bench/ off it)

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import lincat  # noqa: E402
from lincat.modeling.modeling_lincat import lincat_modules, set_attention_mode, set_backend  # noqa: E402


def grads_of(model, ids, backend):
    set_backend(model, backend)
    set_attention_mode(model, "transfer")
    model.zero_grad()
    model(ids)
    loss = sum(m.transfer_loss for m in lincat_modules(model))
    loss.backward()
    return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def main():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)
    for kind in ("lolcats", "hedgehog"):
        model = lincat.convert(LlamaForCausalLM(cfg).to("cuda", torch.bfloat16), "lolcats", kind=kind)
        with torch.no_grad():  # feature maps away from their identity init
            for n, p in model.named_parameters():
                if "feature_map" in n:
                    p.add_(torch.randn_like(p) * 0.05)
        ids = torch.randint(0, cfg.vocab_size, (2, 2048), device="cuda")
        (lt, gt), (lk, gk) = grads_of(model, ids, "torch"), grads_of(model, ids, "triton")
        errs = {n: ((gk[n] - gt[n]).norm() / gt[n].norm().clamp_min(1e-30)).item() for n in gt}
        worst = max(errs, key=errs.get)
        fmap = max(v for n, v in errs.items() if "feature_map" in n)
        print(json.dumps(dict(kind=kind, loss_torch=lt, loss_triton=lk, gradients=len(errs), worst=worst,
                              worst_rel=errs[worst], worst_feature_map_rel=fmap)), flush=True)


if __name__ == "__main__":
    main()
