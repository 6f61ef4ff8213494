"""GPT-NeoX / Pythia (HF ``GPTNeoXForCausalLM``)."""

from __future__ import annotations

from factlab.models.adapters.base import Adapter, MlpModules, SiteSpec

CONFIG_CLASSES = ("GPTNeoXConfig",)


def make(config: object) -> Adapter:
    c = config
    return Adapter(
        config=c,
        family="gpt_neox",
        n_layers=c.num_hidden_layers,
        d_model=c.hidden_size,
        vocab_size=c.vocab_size,
        n_heads=c.num_attention_heads,
        n_kv_heads=c.num_attention_heads,
        d_head=c.hidden_size // c.num_attention_heads,
        d_mlp=c.intermediate_size,
        layers_path="gpt_neox.layers",
        global_sites={
            "embed": SiteSpec("gpt_neox.embed_in"),
            "final_norm": SiteSpec("gpt_neox.final_layer_norm"),
            "logits": SiteSpec("lm_head"),
        },
        layer_sites={
            "resid": SiteSpec(""),
            "attn.out": SiteSpec("attention"),
            "attn.heads": SiteSpec("attention.dense", "input", heads=c.num_attention_heads),
            "mlp.out": SiteSpec("mlp"),
            "mlp.key": SiteSpec("mlp.dense_4h_to_h", "input"),
        },
        projections={
            "mlp": ("mlp.dense_4h_to_h", "mlp.key", "mlp.out", False, None),
            "attn": ("attention.dense", "attn.heads", "attn.out", False, None),
        },
        final_norm_path="gpt_neox.final_layer_norm",
        trace_kinds={"residual": "resid", "mlp": "mlp.out", "attn": "attn.out"},
        mlp=MlpModules("post_attention_layernorm", "mlp.dense_h_to_4h", "mlp.act", "mlp.dense_4h_to_h",
                       parallel=bool(getattr(c, "use_parallel_residual", True))),
    )
