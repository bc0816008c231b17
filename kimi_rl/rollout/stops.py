"""Stop strings: text that ends a response wherever the tokenizer splits it.

A stop token (the tokenizer's EOS, a chat template's end-of-turn token, `prompt.stop_tokens`)
is one token id. A stop string (`prompt.stop_strings`, e.g. "</answer>") may be several
tokens, and not always the same ones ("</answer>" after a space or a newline can merge
differently). The definition: a response ends at its first token after which the decoded
response (earlier segments of a partial rollout included) contains a stop string; that
token is the response's last, so the stop string is part of the response (the format
reward and the verifiers read it), and the finish reason is "stop".

Two implementations of the same condition, as for repeat detection:
- :func:`stop_position`, a pure function on a token list (decodes every prefix; the
  definition, for tests and tools);
- :class:`StopStringTracker`, incremental and batched, for both rollout engines. A stop
  string of b UTF-8 bytes lies within the last b tokens of the text that first contains
  it (every token decodes to at least one character; a byte-level token that is part of
  a character decodes to U+FFFD), so only a window of the last b + MARGIN tokens is
  decoded, and only for rows whose new token could end a stop string (its text contains
  the last character of one, is part of a character, or is blank): a cached per-token
  test.
  The margin keeps the window's first tokens away from the string, so that tokenizers
  that drop a leading space when decoding (SentencePiece) still show a string that
  starts with one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

MARGIN = 4
REPLACEMENT = "\ufffd"


def check_stop_strings(strings: Sequence[str]) -> None:
    """Refuse a stop string that is not a non-empty string (naming the config key)."""
    for s in strings:
        if not isinstance(s, str) or not s:
            raise ValueError(f"prompt.stop_strings: each must be a non-empty string, got {s!r}")


class StopStrings:
    """Stop strings with the decoder of the model's tokenizer. `decode(ids) -> str` decodes
    token ids as the response's text (special tokens kept)."""

    def __init__(self, strings: Sequence[str], decode: Callable[[list[int]], str]):
        check_stop_strings(strings)
        self.strings = tuple(dict.fromkeys(strings))
        self.decode = decode
        self.window = max(len(s.encode()) for s in self.strings) + MARGIN if strings else 0
        self._last = {s[-1] for s in self.strings}
        self._may_end: dict[int, bool] = {}

    @classmethod
    def from_tokenizer(cls, strings: Sequence[str], tokenizer) -> StopStrings | None:
        """None when there are no stop strings."""
        if not strings:
            return None
        return cls(strings, lambda ids: tokenizer.decode(ids, skip_special_tokens=False))

    def may_end(self, token: int) -> bool:
        """Could appending this token complete a stop string?"""
        hit = self._may_end.get(token)
        if hit is None:
            text = self.decode([token])
            # empty or blank: its text may differ in context (a SentencePiece space)
            hit = (REPLACEMENT in text or not text.strip()
                   or any(c in text for c in self._last))
            self._may_end[token] = hit
        return hit

    def found(self, tokens: Sequence[int]) -> bool:
        """Does the decoded tail of `tokens` contain a stop string?"""
        text = self.decode(list(tokens[-self.window:]))
        return any(s in text for s in self.strings)

    def tracker(self, rows: int, prefixes: Sequence[Sequence[int]] | None = None
                ) -> StopStringTracker:
        return StopStringTracker(self, rows, prefixes)


class StopStringTracker:
    """:func:`stop_position`, incremental, for `rows` responses at once. `prefixes` (one per
    row, or None): response tokens already generated (earlier segments); a stop string may
    begin in them and end in a new token."""

    def __init__(self, stops: StopStrings, rows: int,
                 prefixes: Sequence[Sequence[int]] | None = None):
        self.stops = stops
        self.tails = [list(p)[-stops.window:] for p in prefixes] if prefixes else [
            [] for _ in range(rows)]

    def push(self, rows: Tensor, tokens: Tensor) -> Tensor:
        """Append tokens[i] to response rows[i]; True where it now contains a stop string."""
        hits = []
        for i, tok in zip(rows.tolist(), tokens.tolist(), strict=True):
            tail = self.tails[i]
            tail.append(tok)
            if len(tail) > self.stops.window:
                del tail[0]
            hits.append(self.stops.may_end(tok) and self.stops.found(tail))
        return torch.tensor(hits, dtype=torch.bool)


def stop_position(tokens: Sequence[int], strings: Sequence[str],
                  decode: Callable[[list[int]], str], prefix: Sequence[int] = ()) -> int | None:
    """The number of tokens of `tokens` up to and including the first one after which
    decode(prefix + tokens[:n]) contains a stop string, or None. The definition, by brute
    force (every prefix decoded whole)."""
    for n in range(1, len(tokens) + 1):
        text = decode(list(prefix) + list(tokens[:n]))
        if any(s in text for s in strings):
            return n
    return None
