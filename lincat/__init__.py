"""lincat: turn a pretrained Hugging Face causal LM into a linear-attention model."""

__version__ = "0.1.0"

from .convert import convert  # noqa: E402
from .export import export_model, load  # noqa: E402
from .modeling.cache import LincatCache  # noqa: E402
from .modeling.modeling_lincat import set_attention_mode, set_backend  # noqa: E402
from .recipe import Recipe, load_recipe  # noqa: E402

__all__ = ["convert", "load", "export_model", "load_recipe", "Recipe", "LincatCache", "set_attention_mode", "set_backend", "__version__"]
