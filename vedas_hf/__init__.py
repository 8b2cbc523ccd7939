"""vedas-hf: Visual Enhanced Depth Scaling (Vedas) for multimodal latent reasoning, as a transformers plugin.

Importing the package registers the Vedas classes (Qwen2-VL, Qwen2.5-VL and Chameleon backbones) with the transformers Auto
classes (so checkpoints load without `trust_remote_code` once the package is installed) and marks them for
`save_pretrained` to write `auto_map` and copy the modeling files (so they also load *with*
`trust_remote_code=True` where the package is absent).
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from .modeling.configuration_vedas import VedasChameleonConfig, VedasQwen2_5_VLConfig, VedasQwen2VLConfig
from .modeling.modeling_vedas import (
    VedasChameleonForConditionalGeneration,
    VedasChameleonModel,
    VedasQwen2_5_VLForConditionalGeneration,
    VedasQwen2_5_VLModel,
    VedasQwen2VLForConditionalGeneration,
    VedasQwen2VLModel,
)

__version__ = "0.1.0"

for _config, _model, _generation in (
    (VedasQwen2VLConfig, VedasQwen2VLModel, VedasQwen2VLForConditionalGeneration),
    (VedasQwen2_5_VLConfig, VedasQwen2_5_VLModel, VedasQwen2_5_VLForConditionalGeneration),
    (VedasChameleonConfig, VedasChameleonModel, VedasChameleonForConditionalGeneration),
):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
    AutoModelForImageTextToText.register(_config, _generation, exist_ok=True)
    _config.register_for_auto_class()
    _model.register_for_auto_class("AutoModel")
    _generation.register_for_auto_class("AutoModelForImageTextToText")

__all__ = [
    "VedasChameleonConfig",
    "VedasChameleonForConditionalGeneration",
    "VedasChameleonModel",
    "VedasQwen2VLConfig",
    "VedasQwen2VLForConditionalGeneration",
    "VedasQwen2VLModel",
    "VedasQwen2_5_VLConfig",
    "VedasQwen2_5_VLForConditionalGeneration",
    "VedasQwen2_5_VLModel",
]
