"""A tiny Hugging Face-format chat model with random weights, built offline.

Used by tests and the CPU demo in place of Qwen2.5-Math: same architecture family
(Qwen2 or Llama), a byte-level BPE tokenizer trained here on a generated corpus, ChatML
special tokens and chat template. Nothing is downloaded. The output is deterministic:
the same parameters give byte-identical files.
"""
from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from megatron_tbrm.data import SYSTEM_PROMPT  # noqa: F401  (re-exported)

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]  # ids 0, 1, 2

# Qwen2's pre-tokenizer regex: each digit (\p{N}) is its own pre-token, so BPE never merges
# digits and every number is spelled digit by digit, which helps arithmetic.
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ChatML as Qwen2 renders it, without Qwen2's default system turn: a caller that wants a
# system prompt passes one (megatron_tbrm.data does), and one that does not gets none.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# The generator's version: bump when the output changes for the same parameters, so
# cached models (tiny_model_dir fixture) are rebuilt.
GENERATOR_VERSION = 1


@dataclasses.dataclass(frozen=True)
class TinyModelSpec:
    family: str = "qwen2"  # "qwen2" (q/k/v bias) or "llama" (no bias)
    seed: int = 0
    layers: int = 2
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 256
    vocab_size: int = 512
    tie: bool = False
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.family not in ("qwen2", "llama"):
            raise ValueError(f"family={self.family!r}: allowed values are 'qwen2', 'llama'")
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} is not divisible by heads={self.heads}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads={self.heads} is not divisible by kv_heads={self.kv_heads}")
        if self.head_dim < 32:
            # vLLM's CPU attention accepts head sizes 32, 64, 80, ... only.
            raise ValueError(f"head_dim={self.head_dim} (hidden/heads) must be >= 32 for vLLM CPU")
        if self.vocab_size < 300:
            raise ValueError(f"vocab_size={self.vocab_size} must be >= 300 (256 bytes + specials + merges)")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def cache_key(self) -> str:
        blob = json.dumps({"v": GENERATOR_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------
# Tokenizer


def tokenizer_corpus(seed: int = 1234, n_arith: int = 3000) -> list[str]:
    """Text the tokenizer is trained on: the system prompt, arithmetic Q&A in the demo's
    format, chat turns, and some general English / math prose. Independent of the weight
    seed so every tiny model shares one tokenizer."""
    rng = random.Random(seed)
    lines = [SYSTEM_PROMPT] * 50
    for _ in range(n_arith):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        op = rng.choice("+-*")
        c = a + b if op == "+" else a - b if op == "-" else a * b
        q = f"What is {a} {op} {b}?"
        s = f"{a} {op} {b} = {c}. The answer is \\boxed{{{c}}}."
        lines += [q, s, f"{IM_START}system\n{SYSTEM_PROMPT}{IM_END}\n{IM_START}user\n{q}{IM_END}\n"
                  f"{IM_START}assistant\n{s}{IM_END}\n"]
    prose = [
        "Let x be a positive integer such that the sum of its digits is equal to the product.",
        "Find the remainder when the number is divided by seven, and explain each step.",
        "First, we compute the value of the expression. Then we simplify the fraction.",
        "Therefore the answer is the smallest integer greater than the square root of two.",
        "The probability that a randomly chosen point lies inside the circle is $\\frac{\\pi}{4}$.",
        "Suppose $f(x) = x^2 + 3x - 4$. Compute $f(2)$ and find all real roots of $f$.",
        "A triangle has sides of length 3, 4 and 5. What is its area? The area is 6.",
        "We know that $\\sqrt{16} = 4$ and $2^{10} = 1024$, so the ratio is $\\frac{1}{256}$.",
        "How many ways are there to choose two of the ten students for the committee?",
        "Since the equation holds for every value, we can substitute and solve for $y$.",
        "The quick brown fox jumps over the lazy dog while the students count to one hundred.",
        "If the answer is not an integer, write it as a fraction in lowest terms.",
        "Hence the sequence is arithmetic, with first term 5 and common difference 3.",
        "Solve the system of equations: $x + y = 10$ and $x - y = 2$. Then $x = 6$, $y = 4$.",
        "Note that the function is increasing on the interval, so its minimum is at zero.",
        "In this problem we are given a rectangle whose width is half of its length.",
    ]
    lines += prose * 40
    return lines


def train_tokenizer(vocab_size: int, corpus: list[str] | None = None):
    """Byte-level BPE in Qwen2's layout (NFC, digit-splitting regex, byte-level), trained
    offline; returns a `tokenizers.Tokenizer`."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus if corpus is not None else tokenizer_corpus(), trainer=trainer)
    return tok


def tokenizer_config(model_max_length: int) -> dict:
    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    return {
        # The generic fast tokenizer wraps tokenizer.json as is (a model-specific class may
        # rebuild the pipeline from its own defaults).
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "additional_special_tokens": [IM_START, IM_END],
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }


# ---------------------------------------------------------------------------------------
# Model config and weights


def hf_config(spec: TinyModelSpec) -> dict:
    eot, eos = SPECIAL_TOKENS.index(ENDOFTEXT), SPECIAL_TOKENS.index(IM_END)
    cfg: dict = {
        "architectures": ["Qwen2ForCausalLM" if spec.family == "qwen2" else "LlamaForCausalLM"],
        "model_type": spec.family,
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden,
        "intermediate_size": spec.ffn,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "initializer_range": spec.initializer_range,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_theta": spec.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": spec.tie,
        "attention_dropout": 0.0,
        "use_cache": True,
        "bos_token_id": eot,
        "eos_token_id": eos,
        "pad_token_id": eot,
        "torch_dtype": "float32",
    }
    if spec.family == "qwen2":
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=spec.layers)
    else:
        cfg.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    return cfg


def generation_config() -> dict:
    # Token ids only, no sampling defaults: vLLM applies a model's generation_config
    # sampling values to every request, and RL rollouts must sample at the requested
    # temperature (1.0 in the paper), not at a chat model's 0.7/top_p 0.8.
    eot, eos = SPECIAL_TOKENS.index(ENDOFTEXT), SPECIAL_TOKENS.index(IM_END)
    return {"bos_token_id": eot, "eos_token_id": [eos, eot], "pad_token_id": eot}


def hf_weight_shapes(spec: TinyModelSpec) -> list[tuple[str, tuple[int, ...]]]:
    """HF parameter names and shapes, in a fixed order (the order weights are drawn in)."""
    h, q, kv, f = spec.hidden, spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim, spec.ffn
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (spec.vocab_size, h))]
    for i in range(spec.layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (q, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h))]
        if spec.family == "qwen2":
            out += [(p + "self_attn.q_proj.bias", (q,)),
                    (p + "self_attn.k_proj.bias", (kv,)),
                    (p + "self_attn.v_proj.bias", (kv,))]
        out += [(p + "self_attn.o_proj.weight", (h, q)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (f, h)),
                (p + "mlp.up_proj.weight", (f, h)),
                (p + "mlp.down_proj.weight", (h, f))]
    out.append(("model.norm.weight", (h,)))
    if not spec.tie:  # HF drops lm_head.weight from the file when it is tied
        out.append(("lm_head.weight", (spec.vocab_size, h)))
    return out


def init_weights(spec: TinyModelSpec) -> dict[str, torch.Tensor]:
    """HF's initialisation (matrices ~ N(0, initializer_range), biases 0, norms 1) drawn
    from one seeded generator, so it does not depend on transformers' init code paths."""
    gen = torch.Generator().manual_seed(spec.seed)
    weights = {}
    for name, shape in hf_weight_shapes(spec):
        if name.endswith("norm.weight"):
            t = torch.ones(shape)
        elif name.endswith(".bias"):
            t = torch.zeros(shape)
        else:
            t = torch.empty(shape).normal_(0.0, spec.initializer_range, generator=gen)
        weights[name] = t.contiguous()
    return weights


# ---------------------------------------------------------------------------------------
# Writing the folder


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def write_tiny_model(out: str | os.PathLike, spec: TinyModelSpec) -> Path:
    """Write config.json, generation_config.json, model.safetensors, tokenizer.json and
    tokenizer_config.json into `out` (created if missing)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(spec.vocab_size)
    n_tok = tok.get_vocab_size(with_added_tokens=True)
    if n_tok > spec.vocab_size:  # the trainer never exceeds its target; guard the contract
        raise RuntimeError(f"tokenizer has {n_tok} tokens > vocab_size={spec.vocab_size}")
    tok.save(str(out / "tokenizer.json"), pretty=True)
    _write_json(out / "tokenizer_config.json", tokenizer_config(spec.max_position_embeddings))
    _write_json(out / "config.json", hf_config(spec))
    _write_json(out / "generation_config.json", generation_config())
    save_file(init_weights(spec), str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in out.iterdir():  # safetensors writes 0600; keep the folder readable like any checkout
        f.chmod(0o644)
    return out


def cached_tiny_model(cache_root: str | os.PathLike, spec: TinyModelSpec | None = None) -> Path:
    """Build the tiny model once per spec under `cache_root/<key>`; safe under concurrent
    processes (a file lock serialises builders, and the folder appears by atomic rename, so
    a reader never sees a half-written model)."""
    spec = spec or TinyModelSpec()
    root = Path(cache_root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{spec.family}-{spec.cache_key()}"
    if (final / "model.safetensors").exists():
        return final
    with open(root / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (final / "model.safetensors").exists():
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
            try:
                write_tiny_model(tmp, spec)
                tmp.chmod(0o755)  # mkdtemp makes it 0700
                os.rename(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> None:
    d = TinyModelSpec()
    p = argparse.ArgumentParser(description=CLI_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--family", choices=["qwen2", "llama"], default=d.family)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument("--kv-heads", type=int, default=d.kv_heads)
    p.add_argument("--ffn", type=int, default=d.ffn)
    p.add_argument("--vocab-size", type=int, default=d.vocab_size)
    p.add_argument("--tie", action=argparse.BooleanOptionalAction, default=d.tie,
                   help="tie input embeddings and lm_head")
    p.add_argument("--max-position-embeddings", type=int, default=d.max_position_embeddings)
    p.add_argument("--rope-theta", type=float, default=d.rope_theta)
    p.add_argument("--rms-norm-eps", type=float, default=d.rms_norm_eps)
    p.add_argument("--initializer-range", type=float, default=d.initializer_range)
    a = p.parse_args(argv)
    fields = {f.name for f in dataclasses.fields(TinyModelSpec)}
    spec = TinyModelSpec(**{k: v for k, v in vars(a).items() if k in fields})
    out = write_tiny_model(a.out, spec)
    print(f"wrote {spec.family} tiny model to {out}")



CLI_DOC = """Write a tiny random-weight Hugging Face chat model (Qwen2 or Llama) for tests and the CPU demo.

    python -m megatron_tbrm.demo.tiny --out runs/tiny [--seed 0] [--family qwen2|llama]
        [--layers 2 --hidden 128 --heads 4 --kv-heads 2 --ffn 256 --vocab-size 512]
        [--tie | --no-tie] [--max-position-embeddings 1024] [--rope-theta 10000]

Deterministic: the same arguments give byte-identical files."""


if __name__ == "__main__":
    main()
