"""The Hugging Face face of a nanoMindVL model that no transformers class expresses (a Qwen3, Llama, Qwen3-MoE or
DeepSeek-V3 decoder behind the Qwen2.5 ViT, or 1D rotary): `evaluate.py --export-hf` copies this file beside the
weights, and transformers loads the directory with trust_remote_code=True through AutoModelForImageTextToText
(or AutoModelForCausalLM). It reuses transformers' own Qwen2.5-VL vision model (whose merger is our connector)
and the decoder family's own causal-LM class; image features replace the <|image_pad|> embeddings in order,
and positions are 1D (the image tokens count like text), as in model.MLLM.
"""
from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.configuration_utils import SubConfigSpec
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel


@strict
class NanoMindVLConfig(PreTrainedConfig):
    model_type = "nanomindvl"
    sub_configs_defaults = {"vision_config": Qwen2_5_VLVisionConfig,
                            "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen3")}
    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 151655
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False


class NanoMindVLForConditionalGeneration(PreTrainedModel, GenerationMixin):
    config_class = NanoMindVLConfig
    base_model_prefix = ""
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen2_5_VLVisionBlock"]
    _supports_sdpa = True

    def __init__(self, config):
        super().__init__(config)
        self.visual = Qwen2_5_VisionTransformerPretrainedModel._from_config(config.vision_config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def forward(self, input_ids=None, pixel_values=None, image_grid_thw=None, inputs_embeds=None, **kwargs):
        """The decoder's output (logits, loss with `labels`, the cache) with each image's merged ViT features in
        place of its <|image_pad|> tokens; pixel_values and image_grid_thw as Qwen2.5-VL's processor gives them."""
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
            if pixel_values is not None:
                features = self.visual(pixel_values.to(self.visual.dtype), grid_thw=image_grid_thw).pooler_output
                is_pad = (input_ids == self.config.image_token_id).unsqueeze(-1).expand_as(inputs_embeds)
                if int(is_pad[..., 0].sum()) != features.shape[0]:
                    raise ValueError(f"{int(is_pad[..., 0].sum())} <|image_pad|> tokens for {features.shape[0]} "
                                     "image features")
                inputs_embeds = inputs_embeds.masked_scatter(is_pad, features.to(inputs_embeds.dtype))
        return self.language_model(inputs_embeds=inputs_embeds, **kwargs)
