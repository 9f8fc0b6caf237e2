import os
from pathlib import Path

import pytest
import torch
import transformers

SHARED = Path(__file__).resolve().parents[2] / "shared"
STORIES = SHARED / "models" / "stories260K"
LINCAT_REF = SHARED / "models" / "lincat-ref"

# Triton kernels run in its interpreter on CPU-only machines (CI). This must be set before anything imports triton:
# triton.language's own helpers (tl.sum, tl.max, ...) are built in one mode at import, and importing lincat imports
# triton (through torch), so a test module setting it at collection is too late once another module imported lincat.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
transformers.logging.set_verbosity_error()
torch.set_num_threads(2)

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)

# One tiny random model per supported architecture family, built from configs (no downloads).
ARCHS = {
    "llama": lambda: transformers.LlamaConfig(**TINY),
    "llama3": lambda: transformers.LlamaConfig(**TINY, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64)),
    "llama-yarn": lambda: transformers.LlamaConfig(**TINY, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64)),
    "mistral": lambda: transformers.MistralConfig(**TINY, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**TINY),
    "qwen3": lambda: transformers.Qwen3Config(**TINY, head_dim=16),
    "phi3": lambda: transformers.Phi3Config(**TINY, pad_token_id=0),
}


def tiny_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = ARCHS[arch]()
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return model.eval()


def stories_model():
    if not STORIES.exists():
        pytest.skip(f"{STORIES} is missing")
    return transformers.AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
