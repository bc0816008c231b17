"""Prompt formats: how a problem's text becomes the model's prompt, where the response's
final answer is read, what ends a response, and what the format reward checks.

One `PromptFormat` (from the `prompt` config group, conf/prompt/) is used by every path
that prompts the model: rollouts, SFT demonstrations, evaluation and difficulty
annotation all encode through `PromptFormat.encode`.

- `raw`: the problem's text as it is (the built-in task's format; the default).
- `chat`: the tokenizer's own chat template (`apply_chat_template`, generation prompt
  added), an optional system message, and `instruction` appended to the user message.
- `r1_zero`: the DeepSeek-R1-Zero template for base models (DeepSeek-R1 report, table 1):
  the assistant reasons inside <think> </think> and answers inside <answer> </answer>;
  the prompt ends with "Assistant: <think>", so a response closes the reasoning, then
  gives the answer block. The answer is read from the last <answer> block.
- `template`: a user-supplied format string with the fields {prompt}, {system} and
  {instruction} (literal braces doubled: {{ }}).

A response ends at the tokenizer's EOS, at the chat template's end-of-turn token (e.g.
<|im_end|>, whatever the tokenizer's eos_token says), at `stop_tokens` (one token each) and
after `stop_strings` (text, however it is tokenized: kimi_rl/rollout/stops.py).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from .rollout.stops import StopStrings, check_stop_strings

FORMATS = ("raw", "chat", "r1_zero", "template")
ANSWER_LOCATIONS = ("auto", "final", "tags")
TEMPLATE_FIELDS = ("prompt", "system", "instruction")

# DeepSeek-R1 report, table 1, with the reasoning opened for the model ("<think>")
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the "
    "Assistant solves it. The assistant first thinks about the reasoning process in the "
    "mind and then provides the user with the answer. The reasoning process and answer "
    "are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think> <answer> answer here </answer>. "
    "User: {prompt}. Assistant: <think>")

# a response to the r1_zero prompt: the reasoning (no tag of its own), </think>, one answer
# block, nothing after it
_R1_RESPONSE = re.compile(r"(?:(?!</?think>|</?answer>).)*</think>\s*<answer>"
                          r"((?:(?!</?think>|</?answer>).)*)</answer>\s*", re.DOTALL)
_ANSWER_BLOCK = re.compile(r"<answer>((?:(?!<answer>).)*?)</answer>", re.DOTALL)


def answer_block(response: str) -> str | None:
    """The content of the last complete <answer>...</answer> block, else None."""
    blocks = _ANSWER_BLOCK.findall(response)
    return blocks[-1] if blocks else None


def r1_format_ok(response: str) -> bool:
    """Does a response to the r1_zero prompt follow its template: reasoning, </think>,
    exactly one <answer> block with some content, and nothing after it (R1's format
    reward)? The prompt already opened <think>."""
    m = _R1_RESPONSE.fullmatch(response)
    return bool(m and m.group(1).strip())


def _fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


@dataclass(frozen=True)
class PromptFormat:
    """A `prompt` config section (kimi_rl.config.PromptConfig) made usable."""

    format: str = "raw"
    system: str | None = None
    instruction: str = ""
    template: str | None = None
    answer: str = "auto"
    stop_tokens: tuple[str, ...] = ()
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"prompt.format: unknown format {self.format!r} "
                             f"(choose from {list(FORMATS)})")
        if self.answer not in ANSWER_LOCATIONS:
            raise ValueError(f"prompt.answer: must be one of {list(ANSWER_LOCATIONS)}, "
                             f"got {self.answer!r}")
        if self.format == "template":
            if not self.template:
                raise ValueError("prompt.template: required with prompt.format=template "
                                 "(a string with {prompt}, and optionally {system} and "
                                 "{instruction})")
            try:
                names = _fields(self.template)
            except ValueError as e:
                raise ValueError(f"prompt.template: {e} (write literal braces as {{{{ }}}})"
                                 ) from None
            bad = sorted({n for n in names if n not in TEMPLATE_FIELDS})
            if bad:
                raise ValueError(f"prompt.template: unknown fields {bad} (fields: "
                                 f"{list(TEMPLATE_FIELDS)}; literal braces as {{{{ }}}})")
            if "prompt" not in names:
                raise ValueError("prompt.template: has no {prompt} field")
        check_stop_strings(self.stop_strings)

    @classmethod
    def from_config(cls, cfg: Any) -> PromptFormat:
        """From a PromptConfig (or None: raw)."""
        if cfg is None:
            return cls()
        return cls(cfg.format, cfg.system, cfg.instruction or "", cfg.template, cfg.answer,
                   tuple(cfg.stop_tokens), tuple(getattr(cfg, "stop_strings", ()) or ()))

    @property
    def answer_location(self) -> str:
        """Where verifiers read the final answer: "tags" (the last <answer> block) or
        "final" (the last \\boxed{} or a final answer line)."""
        if self.answer != "auto":
            return self.answer
        return "tags" if self.format == "r1_zero" else "final"

    # ---- prompts --------------------------------------------------------------------

    def user_message(self, prompt: str) -> str:
        """The problem's text with the instruction after it (chat)."""
        return f"{prompt.rstrip()}\n\n{self.instruction}" if self.instruction else prompt

    def text(self, tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
        """The whole prompt as text."""
        if self.format == "raw":
            return prompt
        if self.format == "chat":
            messages = [{"role": "system", "content": self.system}] if self.system else []
            messages.append({"role": "user", "content": self.user_message(prompt)})
            return tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True)
        if self.format == "r1_zero":
            return R1_ZERO_TEMPLATE.format(prompt=prompt.strip())
        return self.template.format(prompt=prompt, system=self.system or "",
                                    instruction=self.instruction)

    def encode(self, tokenizer: PreTrainedTokenizerBase, prompt: str,
               response_prefix: str = "") -> list[int]:
        """Token ids of the prompt, followed by `response_prefix` (text the response is
        made to start with). Chat templates write their own special tokens; the other
        formats get the tokenizer's (e.g. a BOS), as raw prompts always have."""
        text = self.text(tokenizer, prompt) + response_prefix
        return tokenizer(text, add_special_tokens=self.format != "chat").input_ids

    def fixed_text(self) -> str:
        """Characters the format adds around problems (for a character vocabulary)."""
        if self.format == "r1_zero":
            return R1_ZERO_TEMPLATE
        if self.format == "template":
            return self.template + (self.system or "") + self.instruction
        return (self.system or "") + self.instruction

    # ---- stops ----------------------------------------------------------------------

    def stop_token_ids(self, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        """Tokens that end a response: the tokenizer's EOS, the chat template's
        end-of-turn token (chat) and `stop_tokens`, in that order, without repeats."""
        ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        if self.format == "chat":
            turn = end_of_turn_id(tokenizer)
            if turn is not None:
                ids.append(turn)
        ids += [self._single_token(tokenizer, t) for t in self.stop_tokens]
        return list(dict.fromkeys(ids))

    def stop_text(self, tokenizer: PreTrainedTokenizerBase) -> StopStrings | None:
        """`stop_strings` with this tokenizer's decoder (None: there are none)."""
        return StopStrings.from_tokenizer(self.stop_strings, tokenizer)

    def end_token_id(self, tokenizer: PreTrainedTokenizerBase) -> int:
        """The token a complete response ends with (SFT targets): the chat template's
        end-of-turn token with `chat` (when it has one), else EOS."""
        turn = end_of_turn_id(tokenizer) if self.format == "chat" else None
        return tokenizer.eos_token_id if turn is None else turn

    @staticmethod
    def _single_token(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
        ids = tokenizer(token, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(f"prompt.stop_tokens: {token!r} is {len(ids)} tokens for this "
                             f"tokenizer, not one")
        return ids[0]

    def check(self, tokenizer: PreTrainedTokenizerBase, model_dir: str | None) -> None:
        """Fail at start when the tokenizer cannot serve the format: `chat` without a chat
        template, a stop token that is not one token. `model_dir` names the model."""
        where = f"model directory {model_dir}" if model_dir else "the built-in tokenizer"
        if self.format == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"prompt.format=chat: {where} has no chat template (no "
                             f"chat_template in its tokenizer_config.json or "
                             f"chat_template.jinja); use prompt=raw, prompt=r1_zero or "
                             f"prompt=template")
        self.stop_token_ids(tokenizer)

    # ---- responses ------------------------------------------------------------------

    def format_ok(self, response: str) -> bool:
        """Does the response follow the format (the format reward)? Tags: the r1_zero
        response shape; final: a final answer the verifiers can read."""
        if self.answer_location == "tags":
            return r1_format_ok(response)
        from .rewards.verify import final_answer

        return final_answer(response) is not None


RAW = PromptFormat()


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The special token the chat template writes right after an assistant message
    (<|im_end|>, <|eot_id|>, <end_of_turn>...), or None if it writes none."""
    marker = "KIMIRLMARKER"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}],
            tokenize=False)
    except Exception:  # a template that refuses this conversation has no answer here
        return None
    if marker not in text:
        return None
    after = text[text.rindex(marker) + len(marker):]
    ids = tokenizer(after, add_special_tokens=False).input_ids
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    return ids[0] if ids and ids[0] in special else None


def prompt_format(cfg: Any) -> PromptFormat:
    """The run's prompt format from a TrainConfig (raw for configs without `prompt`)."""
    return PromptFormat.from_config(getattr(cfg, "prompt", None))
