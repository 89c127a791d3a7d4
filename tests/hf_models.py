"""Real library models built from tiny configs with random weights (no downloads).

Each factory returns `(model.eval(), example_inputs)` with fresh random inputs, and calls
pytest.skip when the library or the model class is missing in the installed version. EXPECTED
maps a name to (attention layers, nn.Linear layers). GPT-2 has no nn.Linear: its projections are
transformers' Conv1D (y = x @ W + b with W stored (in, out)). timm is not installed, so there is
no timm ViT here.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import NamedTuple
from functools import partial

import pytest
import torch
from torch import nn

__all__ = ["MODEL_FACTORIES", "EXPECTED", "causal_lm"]

LAYERS = 2
HIDDEN = 32
HEADS = 4
SEQ = 8
BATCH = 2
VOCAB = 64


def _library_class(module: str, name: str):
    """The class `name` of library `module`, or pytest.skip naming what is missing."""
    try:
        library = importlib.import_module(module)
    except ImportError:
        pytest.skip(f"{module} is not installed")
    cls = getattr(library, name, None)
    if cls is None:
        pytest.skip(f"{module} {getattr(library, '__version__', '?')} has no {name}")
    return cls


def _padding_mask() -> torch.Tensor:
    """(B, S) 0/1 mask with right padding in row 0; every row keeps at least one token."""
    lengths = torch.randint(SEQ // 2, SEQ + 1, (BATCH,))
    lengths[0] = SEQ - 3
    return (torch.arange(SEQ)[None, :] < lengths[:, None]).long()


def transformers_model(config_name: str, model_name: str, attn: str, seed: int, **config):
    """transformers' `model_name` built from `config_name`(**config) in eval mode, its weights drawn
    after manual_seed(seed); pytest.skip where the library or either class is missing."""
    config_cls = _library_class("transformers", config_name)
    model_cls = _library_class("transformers", model_name)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**config, attn_implementation=attn))
    return model.eval()


def bert(attn: str) -> tuple[nn.Module, tuple]:
    """BertModel (encoder + pooler) with a padding mask."""
    model = transformers_model(
        "BertConfig", "BertModel", attn, seed=10, vocab_size=VOCAB, hidden_size=HIDDEN,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=2 * HIDDEN,
        max_position_embeddings=2 * SEQ, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    return model, (ids, _padding_mask())


def gpt2(attn: str) -> tuple[nn.Module, tuple]:
    """GPT2Model (causal; Conv1D projections, so no nn.Linear)."""
    model = transformers_model(
        "GPT2Config", "GPT2Model", attn, seed=11, vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS,
        n_head=HEADS, n_positions=2 * SEQ, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0)
    return model, (torch.randint(0, VOCAB, (BATCH, SEQ)),)


def llama(attn: str) -> tuple[nn.Module, tuple]:
    """LlamaModel with GQA: 4 query heads sharing 2 kv heads."""
    model = transformers_model(
        "LlamaConfig", "LlamaModel", attn, seed=12, vocab_size=VOCAB, hidden_size=HIDDEN,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS // 2,
        intermediate_size=2 * HIDDEN, max_position_embeddings=2 * SEQ)
    return model, (torch.randint(0, VOCAB, (BATCH, SEQ)),)


def t5_encoder(attn: str) -> tuple[nn.Module, tuple]:
    """T5EncoderModel with a padding mask: relative position bias and the padding mask are two
    additive biases (eager adds them one after the other)."""
    model = transformers_model(
        "T5Config", "T5EncoderModel", attn, seed=16, vocab_size=VOCAB, d_model=HIDDEN, d_kv=HIDDEN // HEADS,
        d_ff=2 * HIDDEN, num_layers=LAYERS, num_heads=HEADS, relative_attention_num_buckets=8,
        relative_attention_max_distance=16, dropout_rate=0.0)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    return model, (ids, _padding_mask())


def causal_lm(model: nn.Module) -> nn.Module:
    """The LM-head model (for generate) of a decoder built by a factory here, with its weights."""
    lm_class = _library_class("transformers", type(model).__name__.replace("Model", "ForCausalLM"))
    torch.manual_seed(15)
    lm = lm_class(model.config).eval()
    lm.model.load_state_dict(model.state_dict())
    return lm


def diffusers_dit() -> tuple[nn.Module, tuple]:
    """diffusers DiTTransformer2DModel: class-conditional, self-attention only, 16 patches."""
    cls = _library_class("diffusers", "DiTTransformer2DModel")
    torch.manual_seed(13)
    model = cls(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=LAYERS,
                sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=1)
    latents = torch.randn(BATCH, 4, 8, 8)
    timestep = torch.randint(0, 1000, (BATCH,))
    labels = torch.randint(0, 10, (BATCH,))
    return model.eval(), (latents, timestep, labels)


def diffusers_pixart() -> tuple[nn.Module, tuple]:
    """diffusers PixArtTransformer2DModel: self-attention (16 patches) and cross-attention to a
    5-token caption (Sq != Sk)."""
    cls = _library_class("diffusers", "PixArtTransformer2DModel")
    torch.manual_seed(14)
    model = cls(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                num_layers=LAYERS, cross_attention_dim=16, sample_size=8, patch_size=2,
                caption_channels=12, norm_num_groups=1, use_additional_conditions=False)
    latents = torch.randn(BATCH, 4, 8, 8)
    caption = torch.randn(BATCH, 5, 12)
    timestep = torch.randint(0, 1000, (BATCH,))
    return model.eval(), (latents, caption, timestep)


MODEL_FACTORIES: dict[str, Callable[[], tuple[nn.Module, tuple]]] = {
    "bert_eager": partial(bert, "eager"),
    "bert_sdpa": partial(bert, "sdpa"),
    "gpt2_eager": partial(gpt2, "eager"),
    "gpt2_sdpa": partial(gpt2, "sdpa"),
    "llama_eager": partial(llama, "eager"),
    "llama_sdpa": partial(llama, "sdpa"),
    "t5_encoder_eager": partial(t5_encoder, "eager"),
    "t5_encoder_sdpa": partial(t5_encoder, "sdpa"),
    "diffusers_dit": diffusers_dit,
    "diffusers_pixart": diffusers_pixart,
}

# (attention layers, nn.Linear applications: a module called twice counts twice).
# Bert layer: query, key, value, attention output, intermediate, output = 6, plus the pooler.
# Llama layer: q, k, v, o, gate, up, down = 7. DiT block: its own timestep embedder (2), norm1's
# adaLN linear, attn1 (to_q, to_k, to_v, to_out.0), ff (2) = 9; then the final layer calls block
# 0's timestep embedder again (2) and proj_out_1, proj_out_2. PixArt block: attn1 and attn2
# (4 each), ff (2) = 10; plus timestep embedder 2, adaLN-single linear, caption projection 2,
# proj_out. T5 layer: q, k, v, o, wi, wo = 6.
EXPECTED: dict[str, tuple[int, int]] = {
    "bert_eager": (LAYERS, 6 * LAYERS + 1),
    "bert_sdpa": (LAYERS, 6 * LAYERS + 1),
    "gpt2_eager": (LAYERS, 0),
    "gpt2_sdpa": (LAYERS, 0),
    "llama_eager": (LAYERS, 7 * LAYERS),
    "llama_sdpa": (LAYERS, 7 * LAYERS),
    "t5_encoder_eager": (LAYERS, 6 * LAYERS),
    "t5_encoder_sdpa": (LAYERS, 6 * LAYERS),
    "diffusers_dit": (LAYERS, 9 * LAYERS + 4),
    "diffusers_pixart": (2 * LAYERS, 10 * LAYERS + 6),
}


class Call(NamedTuple):
    """One sparsec.attention call run_compiled recorded."""

    patterns: tuple    # the head patterns
    kwargs: dict       # its keyword arguments
    keys: int          # k's length


def run_compiled(model: nn.Module, inputs: tuple, options: dict, **forward_kwargs):
    """`model` compiled by sparsec with `options` (afresh), run on `inputs` under no_grad while every
    sparsec.attention call is recorded: (its last_hidden_state, the compiled graphs' Attention ops,
    [Call of each])."""
    import sparsec
    from sparsec.dump import recording
    from sparsec.ir.ops import Attention
    from sparsec.patterns import Pattern

    calls = []
    original = sparsec.attention

    def counting(q, k, v, patterns, **kwargs):
        calls.append(Call((patterns,) if isinstance(patterns, Pattern) else tuple(patterns), kwargs, k.shape[2]))
        return original(q, k, v, patterns, **kwargs)

    torch._dynamo.reset()
    with torch.no_grad(), recording() as records, pytest.MonkeyPatch.context() as patch:
        patch.setattr(sparsec, "attention", counting)
        out = torch.compile(model, backend="sparsec", options=options)(*inputs, **forward_kwargs).last_hidden_state
    return out, [op for r in records for op in r.final_ir.ops_of(Attention)], calls
