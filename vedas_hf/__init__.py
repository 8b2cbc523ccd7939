"""vedas-hf: Visual Enhanced Depth Scaling (Vedas) for multimodal latent reasoning, as a transformers plugin.

Importing the package registers the Vedas classes with the transformers Auto classes (so checkpoints load without
`trust_remote_code` once the package is installed) and marks them for `save_pretrained` to write `auto_map` and
copy the modeling files (so they also load *with* `trust_remote_code=True` where the package is absent).
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from .modeling.configuration_vedas import VedasQwen2VLConfig
from .modeling.modeling_vedas import VedasQwen2VLForConditionalGeneration, VedasQwen2VLModel

__version__ = "0.1.0"

AutoConfig.register(VedasQwen2VLConfig.model_type, VedasQwen2VLConfig, exist_ok=True)
AutoModel.register(VedasQwen2VLConfig, VedasQwen2VLModel, exist_ok=True)
AutoModelForImageTextToText.register(VedasQwen2VLConfig, VedasQwen2VLForConditionalGeneration, exist_ok=True)

VedasQwen2VLConfig.register_for_auto_class()
VedasQwen2VLModel.register_for_auto_class("AutoModel")
VedasQwen2VLForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = ["VedasQwen2VLConfig", "VedasQwen2VLForConditionalGeneration", "VedasQwen2VLModel"]
