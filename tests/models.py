"""Tiny random models (~1 MB) with real tokenizers trained offline, one per architecture family.

Tokenizers are trained on `pydoc_data.topics` (CPython's docs text) by the `tokenizers` library in about a second, so
nothing is downloaded. Each builder writes a directory that `AutoModelFor*.from_pretrained` and `AutoTokenizer`
load exactly as a server would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch

LLAMA_CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def _corpus() -> Iterator[str]:
    from pydoc_data.topics import topics

    for text in topics.values():
        yield from text.split("\n\n")
    # make sure emoji, CJK and combining characters are representable as byte-level pieces
    yield "emoji 😀👍🏽 ⛔ 中文字符 日本語 한국어 café naïve é"


def _byte_level_tokenizer(specials: list[str], vocab_size: int = 1024):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(_corpus(), trainer)
    return tk


def gpt2_tokenizer():
    from transformers import PreTrainedTokenizerFast

    tk = _byte_level_tokenizer(["<|endoftext|>", "<pad>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<pad>",
    )


def llama_tokenizer():
    """Llama-style: byte-level BPE with `<s>` prepended by the post-processor, `</s>` as EOS, a chat template."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tk = _byte_level_tokenizer(["<unk>", "<s>", "</s>", "<pad>"])
    bos = tk.token_to_id("<s>")
    tk.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]),
        ]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tok.add_bos_token = True
    tok.chat_template = LLAMA_CHAT_TEMPLATE
    return tok


def t5_tokenizer():
    """T5-style: Unigram with NFKC and Metaspace, `</s>` appended by the post-processor."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.Unigram())
    tk.normalizer = normalizers.NFKC()
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=1024, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    tk.train_from_iterator(_corpus(), trainer)
    eos = tk.token_to_id("</s>")
    tk.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


def _save(model, tok, out: Path) -> Path:
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def build_llama(out: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = llama_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )
    return _save(LlamaForCausalLM(cfg), tok, out)


def _random(out: Path, model_type: str, tok, **cfg) -> Path:
    """A tiny random model of `model_type` with tokenizer `tok` (its special ids go into the config)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **cfg)
    return _save(AutoModelForCausalLM.from_config(config), tok, out)


def _llama_family(out: Path, model_type: str, **extra) -> Path:
    """A tiny random model of a Llama-family type (with the Llama tokenizer); `extra` sets the family's quirks."""
    return _random(out, model_type, llama_tokenizer(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                   **{"tie_word_embeddings": False, **extra})


def build_mistral(out: Path) -> Path:
    return _llama_family(out, "mistral", sliding_window=12)  # shorter than test contexts: the window matters


def build_qwen2(out: Path) -> Path:
    return _llama_family(out, "qwen2")  # biased q/k/v projections


def build_qwen3(out: Path) -> Path:
    return _llama_family(out, "qwen3", head_dim=32)  # q/k norms, head_dim != hidden / heads


def build_granite(out: Path) -> Path:
    return _llama_family(out, "granite", embedding_multiplier=2.0, attention_multiplier=0.2,
                         residual_multiplier=0.5, logits_scaling=4.0, tie_word_embeddings=True)


def build_gpt2(out: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = gpt2_tokenizer()
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=512,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    return _save(GPT2LMHeadModel(cfg), tok, out)


def build_gpt_neox(out: Path) -> Path:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    tok = gpt2_tokenizer()
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=512, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return _save(GPTNeoXForCausalLM(cfg), tok, out)


def build_gpt_bigcode(out: Path) -> Path:
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    tok = gpt2_tokenizer()
    torch.manual_seed(0)
    cfg = GPTBigCodeConfig(
        vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=512, multi_query=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    return _save(GPTBigCodeForCausalLM(cfg), tok, out)


def build_t5(out: Path) -> Path:
    from transformers import T5Config, T5ForConditionalGeneration

    tok = t5_tokenizer()
    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=len(tok), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
        decoder_start_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    return _save(T5ForConditionalGeneration(cfg), tok, out)


# Architectures without our own split rules: tensor-parallel through DeepSpeed AutoTP (tests/test_deepspeed.py)
def build_opt(out: Path) -> Path:
    return _random(out, "opt", gpt2_tokenizer(), hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=512)


def build_gptj(out: Path) -> Path:
    return _random(out, "gptj", gpt2_tokenizer(), n_embd=64, n_inner=128, n_layer=2, n_head=4, rotary_dim=8,
                   n_positions=512, tie_word_embeddings=False)


def build_falcon(out: Path) -> Path:
    """The new decoder layout (Falcon-40B/180B): grouped KV heads, two layer norms in parallel attention."""
    return _random(out, "falcon", gpt2_tokenizer(), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_kv_heads=2, new_decoder_architecture=True, max_position_embeddings=512)


def build_falcon_7b_layout(out: Path) -> Path:
    """Falcon-7B's original layout (multi-query, one fused QKV): DeepSpeed AutoTP cannot split it."""
    return _random(out, "falcon", gpt2_tokenizer(), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   new_decoder_architecture=False, multi_query=True, max_position_embeddings=512)


def build_phi(out: Path) -> Path:
    """Phi-1/1.5/2: partial rotary embeddings, parallel attention and MLP, a biased LM head."""
    return _random(out, "phi", gpt2_tokenizer(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, partial_rotary_factor=0.5, max_position_embeddings=512)


def build_starcoder2(out: Path) -> Path:
    return _random(out, "starcoder2", gpt2_tokenizer(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, sliding_window=None,
                   tie_word_embeddings=False)


def build_bloom(out: Path) -> Path:
    return _random(out, "bloom", gpt2_tokenizer(), hidden_size=64, n_layer=2, n_head=4)


BUILDERS: dict[str, Callable[[Path], Path]] = {
    "llama": build_llama,
    "gpt2": build_gpt2,
    "gpt_neox": build_gpt_neox,
    "gpt_bigcode": build_gpt_bigcode,
    "t5": build_t5,
    "mistral": build_mistral,
    "qwen2": build_qwen2,
    "qwen3": build_qwen3,
    "granite": build_granite,
    "opt": build_opt,
    "gptj": build_gptj,
    "falcon": build_falcon,
    "falcon_7b_layout": build_falcon_7b_layout,
    "phi": build_phi,
    "starcoder2": build_starcoder2,
    "bloom": build_bloom,
}
NATIVE = ["llama", "mistral", "qwen2", "qwen3", "granite"]  # the architectures the native engine serves
DECODER_ONLY = ["llama", "gpt2", "gpt_neox", "gpt_bigcode"]


def build(name: str, root: Path) -> Path:
    """Build (once) the tiny model `name` under `root` and return its directory."""
    out = root / name
    if not (out / "config.json").exists():
        tmp = root / f".{name}.partial"
        BUILDERS[name](tmp)
        tmp.rename(out)
    return out
