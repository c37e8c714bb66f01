"""Stage 5, tokenizer gate: the exported GGUF must split every training example into the ids
training used, special tokens included, before anything is registered.

The convert stage's logit check feeds the same token ids to both sides, so it cannot see a GGUF
whose tokenizer differs from training's (a BPE vocabulary written as SentencePiece, a lost
pre-tokenizer, a different BOS). Ollama would then run the model on ids it never trained on, or
its runner would abort on load. Here llama.cpp's own tokenizer (the GGUF's vocabulary only, as
Ollama's runner loads it) tokenizes each example as rendered by the training template, and the
ids are compared with what the trainers tokenized. The first mismatch stops the build, naming the
example and showing both id lists with their pieces.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ollama_ft.errors import StageError

if TYPE_CHECKING:
    from ollama_ft.soft_prompt import SoftTokens

SAMPLE_LIMIT = 1000   # larger data sets are checked on a seeded sample of this many examples


@dataclass
class TokenizerGateInput:
    gguf_path: Path
    tokenizer_path: Path      # the tokenizer training used (saved beside the trained weights)
    chat_jinja: str
    examples: list[dict]      # as training read them: {"messages": …} or {"text": …}
    sources: list[str]        # where each example came from ("data/train.jsonl:12"), for the message
    max_length: int           # training truncated examples to this many tokens
    sample_limit: int = SAMPLE_LIMIT
    seed: int = 0
    soft: SoftTokens | None = None   # the template writes them first, PEFT put them first


@dataclass
class TokenizerGateOutput:
    checked: int
    total: int
    sampled: bool
    tokens_checked: int


def training_ids(example: dict, tokenizer, chat_jinja: str, max_length: int, soft=None) -> list[int]:
    """The ids the trainers fed the model for this example (backends/common.py tokenizes both);
    with a soft prompt, its token ids stand where PEFT put its vectors: before everything."""
    from ollama_ft.backends.common import tokenize_example

    ids = tokenize_example(example, tokenizer, chat_jinja, assistant_only=False)["input_ids"][:max_length]
    return (list(soft.token_ids) + ids) if soft else ids


def gguf_ids(vocab, example: dict, tokenizer, chat_jinja: str, max_length: int, soft=None) -> list[int]:
    """The ids llama.cpp gives the same example, rendered whole, as Ollama's runner tokenizes a prompt."""
    keep = max_length + (len(soft.token_ids) if soft else 0)
    if example.get("text") is not None:
        # Training adds no BOS to plain text and ends it with EOS.
        text = ("".join(soft.tokens) if soft else "") + example["text"]
        ids = vocab.tokenize(text.encode("utf-8"), add_bos=False, special=True) + [vocab.token_eos()]
    else:
        text = tokenizer.apply_chat_template(example["messages"], chat_template=chat_jinja, tokenize=False,
                                             add_generation_prompt=False)
        text = (soft.prefix if soft else "") + text
        ids = vocab.tokenize(text.encode("utf-8"), add_bos=True, special=True)  # BOS if the GGUF says so
    return ids[:keep]


def describe_mismatch(source: str, want: list[int], got: list[int], piece) -> str:
    """Both id lists around the first difference, each id with its piece."""
    at = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
    lo, hi = max(0, at - 4), at + 6

    def show(ids: list[int]) -> str:
        return " ".join(f"{i}:{piece(i)!r}" for i in ids[lo:hi]) or "(end)"

    return (f"{source}: the GGUF's tokenizer splits it differently from training at token {at} "
            f"(training {len(want)} ids, GGUF {len(got)}); training: {show(want)} | GGUF: {show(got)}")


def check_tokenizer(inp: TokenizerGateInput) -> TokenizerGateOutput:
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(inp.tokenizer_path)
    order = list(range(len(inp.examples)))
    sampled = len(order) > inp.sample_limit
    if sampled:
        order = sorted(random.Random(inp.seed).sample(order, inp.sample_limit))
    vocab = Llama(model_path=str(inp.gguf_path), vocab_only=True, verbose=False)
    try:
        def piece(i: int) -> str:
            return vocab.detokenize([i], special=True).decode("utf-8", errors="replace")

        tokens = 0
        for index in order:
            example = inp.examples[index]
            want = training_ids(example, tokenizer, inp.chat_jinja, inp.max_length, inp.soft)
            got = gguf_ids(vocab, example, tokenizer, inp.chat_jinja, inp.max_length, inp.soft)
            if want != got:
                raise StageError("tokenizer gate: " + describe_mismatch(inp.sources[index], want, got, piece),
                                 "nothing was registered; the exported tokenizer is not the one training used "
                                 f"(tokenizer files in {inp.tokenizer_path})")
            tokens += len(want)
    finally:
        vocab.close()
    return TokenizerGateOutput(checked=len(order), total=len(inp.examples), sampled=sampled, tokens_checked=tokens)
