"""Which text tokens a word of a prompt became, from the tokenizer's own offsets.

A word's cross-attention weight is the sum over the text tokens it was split into. The token
positions are key indices of ``attn2``: the pipeline tokenizes the prompt (after its own text
preprocessing; PixArt with ``clean_caption=False`` lower-cases and strips it), pads it to
``max_sequence_length`` and feeds every position to the text encoder, so token i is key i.

- A tokenizers-backed ("fast") tokenizer, such as transformers' SentencePiece ``T5Tokenizer`` of a
  real PixArt, reports each token's character span itself (``return_offsets_mapping``).
- The byte-level ``ByT5Tokenizer`` (pure Python, no offsets) makes one token per UTF-8 byte, so a
  character's tokens are its bytes; the spans are checked against the tokenizer's own ids.

Words match whole words of the preprocessed prompt (``"polyp"`` does not match inside
``"polyps"``; a phrase such as ``"normal cecum"`` is one word here); every occurrence counts.

Examples:
    >>> from transformers import ByT5Tokenizer
    >>> find_words(ByT5Tokenizer(), "an endoscopic image of polyps", ["polyps", "of"])
    {'polyps': (23, 24, 25, 26, 27, 28), 'of': (20, 21)}
    >>> from dit_lens import load
    >>> from dit_lens.testing import PixArtSpec, build_pixart
    >>> lens = load(build_pixart(PixArtSpec(num_layers=1)))
    >>> word_tokens(lens, "An endoscopic image of POLYPS", ["Polyps"])  # the pipeline lower-cases
    {'Polyps': (23, 24, 25, 26, 27, 28)}
    >>> prompt_words(lens, "A polyp, dyed.")
    ['a', 'polyp', 'dyed']
"""

from __future__ import annotations

import inspect
import re
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from .lens import Lens

__all__ = ["check_words", "find_words", "prompt_text", "prompt_words", "text_keys", "text_segments", "token_spans",
           "word_keys", "word_tokens"]


def prompt_text(lens: Lens, prompt: str) -> str:
    """The text the pipeline's tokenizer sees for `prompt` (after the pipeline's preprocessing)."""
    preprocess = getattr(lens.pipeline, "_text_preprocessing", None)
    if preprocess is None:
        return prompt
    return preprocess(prompt, clean_caption=bool(lens.pipeline_kwargs.get("clean_caption", False)))[0]


def max_tokens(lens: Lens) -> int | None:
    """How many text tokens the pipeline keeps (``max_sequence_length``; None if it does not say)."""
    if "max_sequence_length" in lens.pipeline_kwargs:
        return int(lens.pipeline_kwargs["max_sequence_length"])
    parameter = inspect.signature(type(lens.pipeline).__call__).parameters.get("max_sequence_length")
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return None
    return int(parameter.default)


def text_segments(lens: Lens) -> list[tuple[Any, int, int]]:
    """``(tokenizer, first key, keys)`` of each text encoder's run of text keys, in key order (one run for
    PixArt and SANA; CLIP's 77 then T5's for SD3). The tokenizer is None where the pipeline has none
    (its keys are then padding the pipeline fills itself)."""
    segments, start = [], 0
    for component, limit in lens.family.text_segments:
        tokenizer = getattr(lens.pipeline, component, None)
        length = getattr(tokenizer, "model_max_length", None) if limit == "model_max_length" else max_tokens(lens)
        if not length:
            raise ValueError(f"{type(lens.pipeline).__name__} does not say how many text tokens {component} keeps "
                             f"(no max_sequence_length); its text keys cannot be laid out")
        segments.append((tokenizer, start, int(length)))
        start += int(length)
    return segments


def text_keys(lens: Lens) -> int:
    """How many text keys the text-conditioning attention has (the padded text length)."""
    return sum(length for _, _, length in text_segments(lens))


def token_spans(tokenizer: Any, text: str, *, max_length: int | None = None) -> list[tuple[int, int] | None]:
    """The character span ``[start, end)`` in `text` of each token the tokenizer makes of it.

    Args:
        tokenizer: A transformers tokenizer: tokenizers-backed (reports offsets) or ``ByT5Tokenizer``.
        text: The text exactly as the tokenizer gets it.
        max_length: Truncate as the pipeline does (special tokens included), or None.

    Returns:
        One entry per token of ``tokenizer(text, add_special_tokens=True)``, None for special tokens
        (EOS) and for tokens that cover no character.

    Raises:
        ValueError: the tokenizer cannot report where its tokens come from.
    """
    options = dict(add_special_tokens=True, truncation=max_length is not None, max_length=max_length)
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True, **options)
        return [None if special else (int(start), int(end))
                for (start, end), special in zip(encoded["offset_mapping"], encoded["special_tokens_mask"])]
    if type(tokenizer).__name__ == "ByT5Tokenizer":
        return _byte_spans(tokenizer, text, tokenizer(text, **options)["input_ids"])
    raise ValueError(
        f"{type(tokenizer).__name__} reports no token offsets, so a word cannot be traced to its tokens; "
        f"use a tokenizers-backed (fast) tokenizer, e.g. transformers' T5Tokenizer, or ByT5Tokenizer"
    )


def _byte_spans(tokenizer: Any, text: str, ids: list[int]) -> list[tuple[int, int] | None]:
    """ByT5: one token per UTF-8 byte of each character, then the special tokens."""
    spans, expected = [], []
    for index, char in enumerate(text):
        for byte in char.encode("utf-8"):
            spans.append((index, index + 1))
            expected.append(tokenizer.convert_tokens_to_ids(chr(byte)))
    kept = len(ids) - tokenizer.num_special_tokens_to_add()
    if kept > len(expected) or ids[:kept] != expected[:kept]:
        raise ValueError(
            f"{type(tokenizer).__name__} did not split {text!r} into one token per byte (the text holds "
            f"special-token strings such as '<extra_id_0>'?); remove them from the prompt"
        )
    return spans[:kept] + [None] * (len(ids) - kept)


def find_words(tokenizer: Any, text: str, words: Sequence[str], *,
               max_length: int | None = None) -> dict[str, tuple[int, ...]]:
    """Token positions of each word (whole-word matches, every occurrence) in `text`.

    Args:
        tokenizer: As for `token_spans`.
        text: The text exactly as the tokenizer gets it.
        words: Words or phrases, matched as they are (no case folding here).
        max_length: The pipeline's token limit (longer texts are truncated), or None.

    Returns:
        ``{word: token positions}``, ascending; a word's tokens include a token shared with a
        neighbouring character (one that covers any character of the word).

    Raises:
        ValueError: a word does not occur in `text`, or lies past the `max_length` kept tokens.
    """
    spans = token_spans(tokenizer, text, max_length=max_length)
    found: dict[str, tuple[int, ...]] = {}
    for word in words:
        if not isinstance(word, str) or not word.strip():
            raise ValueError(f"words must be non-empty strings, got {word!r}")
        pattern = r"(?<!\w)" + re.escape(word.strip()) + r"(?!\w)"
        matches = [(m.start(), m.end()) for m in re.finditer(pattern, text)]
        if not matches:
            inside = f" (words match whole words; {word!r} occurs inside another word)" if word in text else ""
            raise ValueError(f"word {word!r} is not in the prompt {text!r}{inside}")
        tokens = sorted({i for i, span in enumerate(spans) if span is not None
                         for start, end in matches if _covers(span, start, end)})
        if not tokens:
            raise ValueError(f"word {word!r} of the prompt {text!r} lies past the {max_length} tokens the pipeline "
                             f"keeps; shorten the prompt")
        found[word] = tuple(tokens)
    return found


def _covers(span: tuple[int, int], start: int, end: int) -> bool:
    """Whether a token's span meets the characters ``[start, end)`` (a zero-width token counts
    where it stands at the word's start: a SentencePiece ``▁`` before it)."""
    low, high = span
    return low < end and high > start if high > low else low == start


def word_tokens(lens: Lens, prompt: str, words: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Key indices of ``attn2`` (text-token positions) that each word of `prompt` became.

    The prompt and the words go through the pipeline's own preprocessing first, so ``"Polyps"``
    finds the tokens of ``"polyps"`` when the pipeline lower-cases.

    Args:
        lens: A `dit_lens.Lens`.
        prompt: The prompt as passed to the pipeline.
        words: Words or phrases of the prompt.

    Returns:
        ``{word: token positions}`` keyed by the words as given.

    Raises:
        ValueError: a word is not in the prompt (the message names the prompt), or past its kept tokens.
    """
    text = prompt_text(lens, prompt)
    seen = {word: prompt_text(lens, word) if isinstance(word, str) else word for word in words}
    found: dict[str, set[int]] = {processed: set() for processed in seen.values()}
    errors = []
    for tokenizer, start, length in text_segments(lens):  # a word's keys in every text encoder's tokens
        if tokenizer is None:
            continue
        for processed in found:
            try:
                positions = find_words(tokenizer, text, [processed], max_length=length)[processed]
            except ValueError as err:
                errors.append(err)
                continue
            found[processed].update(start + p for p in positions)
    for processed, positions in found.items():
        if not positions:
            first = next((e for e in errors if repr(processed) in str(e)), errors[0] if errors else None)
            raise ValueError(f"{first} (prompt as given: {prompt!r})") from None
    return {word: tuple(sorted(found[processed])) for word, processed in seen.items()}


def prompt_words(lens: Lens, prompt: str) -> list[str]:
    """The words of `prompt` as the pipeline's tokenizer sees them (runs of letters and digits,
    hyphenated words kept whole), each once, in order."""
    words = re.findall(r"\w+(?:-\w+)*", prompt_text(lens, prompt))
    return list(dict.fromkeys(words))


def check_words(words: Any, name: str) -> tuple[str, ...]:
    """`words` (one word or a list) as a tuple of non-empty strings; ValueError naming `name` otherwise."""
    words = (words,) if isinstance(words, str) else tuple(words)
    if not all(isinstance(w, str) and w.strip() for w in words):
        raise ValueError(f"{name} must be a list of words of the prompt, got {words!r}")
    return words


_KEYS: dict[tuple, tuple[int, ...]] = {}


def word_keys(lens: Lens, prompts: Sequence[str], words: Sequence[str]) -> list[Any]:
    """The key indices of all `words` in each prompt (a LongTensor per prompt), for edits that act on
    them at every layer and step: looked up once per (tokenizer, prompt, words), then cached."""
    import torch

    if lens is None or not prompts:
        raise ValueError("edits that name words run only inside generate (which knows each row's prompt)")
    out = []
    for prompt in prompts:
        key = (id(lens.pipeline.tokenizer), prompt, tuple(words))
        if key not in _KEYS:  # word_tokens refuses a word the prompt lacks
            _KEYS[key] = tuple(sorted({t for found in word_tokens(lens, prompt, list(words)).values() for t in found}))
        out.append(torch.tensor(_KEYS[key], dtype=torch.long))
    return out
