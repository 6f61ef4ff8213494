"""Llama-like decoders (Llama, Mistral, Qwen2, SmolLM2): grouped-query attention, gated MLP."""

from __future__ import annotations

from factlab.models.adapters.base import Adapter, MlpModules, SiteSpec

CONFIG_CLASSES = ("LlamaConfig", "MistralConfig", "Qwen2Config", "Qwen3Config")


def make(config: object, family: str = "llama") -> Adapter:
    c = config
    n_heads = c.num_attention_heads
    d_head = getattr(c, "head_dim", None) or c.hidden_size // n_heads
    return Adapter(
        config=c,
        family=family,
        n_layers=c.num_hidden_layers,
        d_model=c.hidden_size,
        vocab_size=c.vocab_size,
        n_heads=n_heads,
        n_kv_heads=getattr(c, "num_key_value_heads", None) or n_heads,
        d_head=d_head,
        d_mlp=c.intermediate_size,
        layers_path="model.layers",
        global_sites={
            "embed": SiteSpec("model.embed_tokens"),
            "final_norm": SiteSpec("model.norm"),
            "logits": SiteSpec("lm_head"),
        },
        layer_sites={
            "resid": SiteSpec(""),
            "attn.out": SiteSpec("self_attn"),
            "attn.heads": SiteSpec("self_attn.o_proj", "input", heads=n_heads),
            "mlp.out": SiteSpec("mlp"),
            "mlp.key": SiteSpec("mlp.down_proj", "input"),
        },
        projections={
            "mlp": ("mlp.down_proj", "mlp.key", "mlp.out", False, None),
            "attn": ("self_attn.o_proj", "attn.heads", "attn.out", False, None),
        },
        final_norm_path="model.norm",
        trace_kinds={"residual": "resid", "mlp": "mlp.out", "attn": "attn.out"},
        mlp=MlpModules("pre_feedforward_layernorm" if family == "gemma3" else "post_attention_layernorm", "mlp.up_proj", "mlp.act_fn",
                       "mlp.down_proj", "mlp.gate_proj"),
    )
