"""GPT-J (HF ``GPTJForCausalLM``): parallel attention and MLP, Linear projections."""

from __future__ import annotations

from factlab.models.adapters.base import Adapter, MlpModules, SiteSpec

CONFIG_CLASSES = ("GPTJConfig",)


def make(config: object) -> Adapter:
    c = config
    return Adapter(
        config=c,
        family="gptj",
        n_layers=c.n_layer,
        d_model=c.n_embd,
        vocab_size=c.vocab_size,
        n_heads=c.n_head,
        n_kv_heads=c.n_head,
        d_head=c.n_embd // c.n_head,
        d_mlp=c.n_inner or 4 * c.n_embd,
        layers_path="transformer.h",
        global_sites={
            "embed": SiteSpec("transformer.wte"),
            "final_norm": SiteSpec("transformer.ln_f"),
            "logits": SiteSpec("lm_head"),
        },
        layer_sites={
            "resid": SiteSpec(""),
            "attn.out": SiteSpec("attn"),
            "attn.heads": SiteSpec("attn.out_proj", "input", heads=c.n_head),
            "mlp.out": SiteSpec("mlp"),
            "mlp.key": SiteSpec("mlp.fc_out", "input"),
        },
        projections={
            "mlp": ("mlp.fc_out", "mlp.key", "mlp.out", False, None),
            "attn": ("attn.out_proj", "attn.heads", "attn.out", False, None),
        },
        final_norm_path="transformer.ln_f",
        trace_kinds={"residual": "resid", "mlp": "mlp.out", "attn": "attn.out"},
        mlp=MlpModules("ln_1", "mlp.fc_in", "mlp.act", "mlp.fc_out", parallel=True),
    )
