"""BLIP-2 Q-Former via transformers' ``Blip2QFormerModel`` (query branch only, no text input)."""

from __future__ import annotations

from transformers import Blip2QFormerConfig, Blip2QFormerModel

from mgpt4.model.presets import QFormerSpec


def build_qformer(spec: QFormerSpec, vision_width: int) -> Blip2QFormerModel:
    """The Q-Former MiniGPT-4 uses: cross-attention to image tokens every 2nd layer, no text FFN.

    MiniGPT-4 deletes the BERT word/position embeddings and each layer's text FFN; with
    ``use_qformer_text_input=False`` the HF model simply does not create them.
    """
    config = Blip2QFormerConfig(
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        intermediate_size=spec.intermediate_size,
        encoder_hidden_size=vision_width,
        cross_attention_frequency=spec.cross_attention_frequency,
        layer_norm_eps=spec.layer_norm_eps,
        use_qformer_text_input=False,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return Blip2QFormerModel(config)
