"""A character-level tokenizer for the built-in task, built with `tokenizers` and saved as
a Hugging Face tokenizer so any HF-compatible engine can load it."""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def char_tokenizer(chars: list[str]) -> PreTrainedTokenizerFast:
    """One token per character; ids 0-3 are <pad>, <bos>, <eos>, <unk>; encoding with
    special tokens prepends <bos>."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(set(chars)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"(?m)."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    bos = vocab["<bos>"]
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )
