"""GPT-2 (HF ``GPT2LMHeadModel``): Conv1D projections store weights as (d_in, d_out)."""

from __future__ import annotations

from factlab.models.adapters.base import Adapter, MlpModules, SiteSpec

CONFIG_CLASSES = ("GPT2Config",)


def make(config: object) -> Adapter:
    c = config
    d_head = c.n_embd // c.n_head
    return Adapter(
        config=c,
        family="gpt2",
        n_layers=c.n_layer,
        d_model=c.n_embd,
        vocab_size=c.vocab_size,
        n_heads=c.n_head,
        n_kv_heads=c.n_head,
        d_head=d_head,
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
            "attn.heads": SiteSpec("attn.c_proj", "input", heads=c.n_head),
            "mlp.out": SiteSpec("mlp"),
            "mlp.key": SiteSpec("mlp.c_proj", "input"),
        },
        projections={
            "mlp": ("mlp.c_proj", "mlp.key", "mlp.out", True, None),
            "attn": ("attn.c_proj", "attn.heads", "attn.out", True, None),
        },
        final_norm_path="transformer.ln_f",
        trace_kinds={"residual": "resid", "mlp": "mlp.out", "attn": "attn.out"},
        mlp=MlpModules("ln_2", "mlp.c_fc", "mlp.act", "mlp.c_proj"),
    )
