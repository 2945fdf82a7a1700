"""Prompt text -> weighted CLIP token windows, the way the AUTOMATIC1111 web UI reads prompts.

Three pure steps, so that a prompt pasted from that UI conditions the UNet the same way here:

1. ``extract_lora_tags`` takes the ``<lora:name:weight>`` tags out of the text (the weights layer
   applies them; CLIP never sees them).
2. ``parse_prompt_attention`` turns the emphasis syntax into ``(text, weight)`` fragments:
   ``(x)`` multiplies the weight of x by 1.1, ``[x]`` divides it by 1.1, ``(x:1.5)`` multiplies
   it by 1.5, nesting multiplies, ``\\(`` is a literal bracket, and ``BREAK`` starts a new window.
3. ``token_windows`` tokenizes the fragments and cuts them into CLIP windows (BOS, at most
   ``length - 2`` tokens, EOS, padding), carrying one weight per position.

After the text encoder, ``apply_emphasis`` scales each token's hidden state by its weight and
rescales every window back to its unweighted mean (A1111's "Original" emphasis). A prompt without
brackets gives weights of exactly 1 everywhere, and ``apply_emphasis`` then returns its input.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

ROUND_BRACKET_FACTOR = 1.1
SQUARE_BRACKET_FACTOR = 1 / 1.1
BREAK = "BREAK"
BREAK_WEIGHT = -1.0
# A1111's default "comma padding backtrack": when a window is full and its last comma is at most
# this many tokens from the end, the window ends after that comma.
COMMA_BACKTRACK = 20
LORA_TAG_KINDS = ("lora", "lyco")  # "lyco" is the alias A1111's built-in LoRA extension accepts

# One syntax element per match; every character of a prompt matches one alternative.
_EMPHASIS_TOKEN = re.compile(
    r"""
      \\[()\[\]\\]              # \( \) \[ \] \\ : the literal character
    | \\                        # any other backslash is dropped
    | [(\[]                     # an opening bracket
    | :\s*([+-]?[.\d]+)\s*\)    # ':1.5)' closes a round bracket with an explicit weight
    | [)\]]                     # a closing bracket
    | [^\\()\[\]:]+             # plain text
    | :                         # a colon that is not part of a weight
    """,
    re.VERBOSE,
)
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")
# A1111's extra-network tag: <kind:arg:arg...>
_EXTRA_NETWORK_TAG = re.compile(r"<(\w+):([^>]+)>")


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """The prompt as ``(text, weight)`` fragments, exactly as A1111's function of this name.

    ``BREAK`` (a whole word, outside brackets) becomes the fragment ``("BREAK", -1.0)``.
    Brackets left open apply to the end of the prompt; a closing bracket without an opening one
    is literal text; adjacent fragments of equal weight are merged.

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    fragments: list[list] = []  # [text, weight]; weights change as brackets close
    open_round: list[int] = []  # where each open bracket's fragments start
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        # In place and in closing order: the float products must match A1111's to the last bit.
        for fragment in fragments[start:]:
            fragment[1] *= factor

    for match in _EMPHASIS_TOKEN.finditer(text):
        token, explicit_weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            fragments.append([token[1:], 1.0])
        elif token == "(":
            open_round.append(len(fragments))
        elif token == "[":
            open_square.append(len(fragments))
        elif explicit_weight is not None and open_round:
            weight = _parse_weight(explicit_weight, f"The emphasis {token!r} in the prompt", "(word:1.3)")
            scale_from(open_round.pop(), weight)
        elif token == ")" and open_round:
            scale_from(open_round.pop(), ROUND_BRACKET_FACTOR)
        elif token == "]" and open_square:
            scale_from(open_square.pop(), SQUARE_BRACKET_FACTOR)
        else:
            for i, part in enumerate(_BREAK_WORD.split(token)):
                if i > 0:
                    fragments.append([BREAK, BREAK_WEIGHT])
                fragments.append([part, 1.0])
    for start in open_round:
        scale_from(start, ROUND_BRACKET_FACTOR)
    for start in open_square:
        scale_from(start, SQUARE_BRACKET_FACTOR)

    merged: list[list] = []
    for fragment_text, weight in fragments or [["", 1.0]]:
        if merged and merged[-1][1] == weight:
            merged[-1][0] += fragment_text
        else:
            merged.append([fragment_text, weight])
    return [(fragment_text, weight) for fragment_text, weight in merged]


@dataclass(frozen=True)
class LoraTag:
    """A ``<lora:name:weight>`` tag: which LoRA, and how strongly it patches each network."""

    name: str
    text_encoder_weight: float
    unet_weight: float


def extract_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """The prompt without its ``<lora:...>`` tags, and the tags in order of appearance.

    Accepted forms (A1111's extra-network syntax): ``<lora:name>`` (weight 1),
    ``<lora:name:0.8>`` (both networks), ``<lora:name:0.8:0.5>`` (text encoder, UNet), and the
    named ``te=`` / ``unet=`` arguments. ``<lyco:...>`` is the same tag. Each tag is replaced by
    nothing, as A1111 does, so the text around it is kept character for character.
    """
    tags: list[LoraTag] = []

    def take(match: re.Match) -> str:
        kind, arguments = match.group(1), match.group(2)
        if kind not in LORA_TAG_KINDS:
            raise ValueError(
                f"Unsupported tag {match.group(0)!r} in the prompt: only LoRA tags are understood "
                f"({', '.join(f'<{k}:name:weight>' for k in LORA_TAG_KINDS)}). Remove the tag."
            )
        tags.append(_lora_tag(match.group(0), arguments.split(":")))
        return ""

    return _EXTRA_NETWORK_TAG.sub(take, prompt), tags


def _lora_tag(tag: str, arguments: list[str]) -> LoraTag:
    positional = [a for a in arguments if "=" not in a]
    named = {key.strip(): value for key, value in (a.split("=", 1) for a in arguments if "=" in a)}
    name = positional[0].strip() if positional else ""
    if not name or len(positional) > 3 or set(named) - {"te", "unet"}:
        raise ValueError(
            f"Malformed LoRA tag {tag!r}: write <lora:name>, <lora:name:weight>, "
            "<lora:name:text_encoder_weight:unet_weight> or <lora:name:te=weight:unet=weight>."
        )
    context, example = f"The LoRA tag {tag!r}", "<lora:name:0.8>"
    text_encoder_weight = _parse_weight(positional[1], context, example) if len(positional) > 1 else 1.0
    if "te" in named:
        text_encoder_weight = _parse_weight(named["te"], context, example)
    unet_weight = _parse_weight(positional[2], context, example) if len(positional) > 2 else text_encoder_weight
    if "unet" in named:
        unet_weight = _parse_weight(named["unet"], context, example)
    return LoraTag(name, text_encoder_weight, unet_weight)


def _parse_weight(text: str, context: str, example: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"{context}: {text.strip()!r} is not a weight. Write a decimal number, e.g. {example}.")
    return value


@dataclass(frozen=True)
class TokenWindow:
    """One text-encoder input: token ids and one emphasis weight per position (same length)."""

    ids: tuple[int, ...]
    weights: tuple[float, ...]


def token_windows(
    tokenizer: CLIPTokenizer, prompt: str, *, length: int = 77, comma_backtrack: int = COMMA_BACKTRACK
) -> list[TokenWindow]:
    """The prompt's CLIP windows, cut where A1111 cuts them; at least one window.

    Each fragment of ``parse_prompt_attention`` is tokenized on its own and its tokens carry its
    weight. A window takes ``length - 2`` tokens. When it is full and the next token is not a
    comma, the window ends after its last comma instead if that comma is at most
    ``comma_backtrack`` tokens from the end (the tokens after it open the next window), so that a
    comma-separated phrase is not torn across two windows. ``BREAK`` ends the current window.
    A comma that opens a window does not count as that window's last comma (as in A1111).
    """
    fragments = parse_prompt_attention(prompt)
    token_lists = tokenizer(
        [text for text, _ in fragments], add_special_tokens=False, truncation=False, verbose=False
    )["input_ids"]
    comma = tokenizer.convert_tokens_to_ids(",</w>")  # (get_vocab() would copy 49k entries)
    if comma == tokenizer.unk_token_id:  # a vocabulary without commas: nothing to backtrack to
        comma = None
    span = length - 2
    windows: list[TokenWindow] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1  # position in ``ids`` of the current window's last comma

    for (text, weight), tokens in zip(fragments, token_lists, strict=True):
        if text == BREAK and weight == BREAK_WEIGHT:
            windows.append(_window(tokenizer, ids, weights, length))
            ids, weights, last_comma = [], [], -1
            continue
        for token in tokens:
            if len(ids) == span:
                backtrack = token != comma and last_comma >= 0 and span - last_comma <= comma_backtrack
                cut = last_comma + 1 if backtrack else span
                windows.append(_window(tokenizer, ids[:cut], weights[:cut], length))
                ids, weights, last_comma = ids[cut:], weights[cut:], -1
            elif token == comma:
                last_comma = len(ids)
            ids.append(token)
            weights.append(weight)
    if ids or not windows:
        windows.append(_window(tokenizer, ids, weights, length))
    return windows


def empty_window(tokenizer: CLIPTokenizer, *, length: int = 77) -> TokenWindow:
    """The empty prompt's window: what pads a prompt to the window count of its negative prompt."""
    return _window(tokenizer, [], [], length)


def _window(tokenizer: CLIPTokenizer, ids: list[int], weights: list[float], length: int) -> TokenWindow:
    # BOS, tokens, EOS, then the tokenizer's pad token (SD 1.x's pads with EOS, SD 2.x's with "!",
    # id 0). A1111 fills with EOS and, for SD 2.x, overwrites everything after the first EOS with
    # id 0: the same ids. BOS, EOS and padding are never emphasised.
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    filler = length - 2 - len(ids)
    return TokenWindow(
        ids=(tokenizer.bos_token_id, *ids, tokenizer.eos_token_id, *[pad] * filler),
        weights=(1.0, *weights, 1.0, *[1.0] * filler),
    )


def apply_emphasis(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis on text-encoder output ``hidden [N, L, D]``, ``weights [N, L]``.

    Each token's hidden state is multiplied by its weight, then each window is rescaled so that
    the mean over all its L·D values equals the unweighted mean (A1111 restores the mean to avoid
    the artifacts that plain scaling gives). Computed in float32 and returned in ``hidden``'s dtype;
    with all weights 1 the input itself is returned, bit for bit.
    """
    if hidden.ndim != 3 or weights.shape != hidden.shape[:2]:
        raise ValueError(
            f"apply_emphasis needs hidden states [N, L, D] and weights [N, L], got "
            f"{tuple(hidden.shape)} and {tuple(weights.shape)}."
        )
    if bool((weights == 1).all()):
        return hidden
    unweighted = hidden.float()
    weighted = unweighted * weights.to(unweighted)[..., None]
    scale = unweighted.mean(dim=(1, 2), keepdim=True) / weighted.mean(dim=(1, 2), keepdim=True)
    return (weighted * scale).to(hidden.dtype)
