"""Configuration of a lincat model: the base model's config plus a per-layer attention plan."""

from dataclasses import asdict, dataclass, fields

from transformers import AutoConfig, PreTrainedConfig

KINDS = ("softmax", "hedgehog", "lolcats", "liger", "swa")


@dataclass
class LayerSpec:
    """How one attention layer is built. Stored as a dict per layer in `config.lincat["layers"]`."""

    kind: str
    path: str  # module path of the attention inside the causal LM, e.g. "model.layers.3.self_attn"
    layer_idx: int  # index of this layer in the model's Cache
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float
    fused_qkv: bool = False  # Phi-3 style qkv_proj
    qk_norm: bool = False  # Qwen3 style per-head q_norm / k_norm
    window: int = 64  # sliding-window length, the current token included
    feature_dim: int = 64  # hedgehog features per side (the map outputs 2x this)
    gqa_shared: bool = False  # one linear state per KV head instead of per query head
    sinks: int = 0  # swa: first tokens always attended
    window_factor_init: float = 0.1  # lolcats: initial gamma = sigmoid(param)
    gate_norm: float = 16.0  # liger: log alpha = logsigmoid(k) / gate_norm
    mix: float = 0.5  # liger: weight of the GLA branch, (1 - mix) for the sliding window
    chunk_size: int = 64  # chunk of the PyTorch chunked forms (the Triton kernels pick their own); same result

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown attention kind {self.kind!r}: use one of {', '.join(KINDS)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.path}: {self.num_heads} heads is not a multiple of {self.num_kv_heads} KV heads")
        if self.window < 1:
            raise ValueError(f"{self.path}: window must be >= 1, got {self.window}")

    @property
    def state_heads(self) -> int:
        """Heads of the linear state (liger's gates live on the key projection, so it always shares)."""
        return self.num_kv_heads if (self.gqa_shared or self.kind == "liger") else self.num_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LayerSpec":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class LincatConfig(PreTrainedConfig):
    """All fields of the base model's config, with `model_type` "lincat", the base's type in `base_model_type`
    and the attention plan in `lincat` ({"layers": [LayerSpec dicts], "recipe": ..., "version": ...})."""

    model_type = "lincat"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, base_model_type: str | None = None, lincat: dict | None = None, **kwargs):
        self.base_model_type = base_model_type
        self.lincat = lincat or {}
        super().__init__(**kwargs)

    @classmethod
    def from_base(cls, base_config: PreTrainedConfig, lincat: dict) -> "LincatConfig":
        d = base_config.to_dict()
        d.pop("model_type", None)
        d.pop("lincat", None)
        return cls(base_model_type=base_config.model_type, lincat=lincat, **d)

    def base_config(self) -> PreTrainedConfig:
        skip = {"model_type", "base_model_type", "lincat", "auto_map", "transformers_version", "architectures"}
        d = {k: v for k, v in self.to_dict().items() if k not in skip}
        cfg = AutoConfig.for_model(self.base_model_type, **d)
        cfg._attn_implementation = self._attn_implementation
        return cfg

    def layer_specs(self) -> list[LayerSpec]:
        return [LayerSpec.from_dict(d) for d in self.lincat.get("layers", [])]
