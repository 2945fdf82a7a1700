"""Prompt weighting: A1111's emphasis parser, its CLIP windowing rules, LoRA tags, the emphasis rule."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import CLIPTokenizer

from stable_diffusion import prompts
from stable_diffusion.prompts import LoraTag, TokenWindow

# ----------------------------------------------------------------------------------------------
# parse_prompt_attention: A1111's doctests (modules/prompt_parser.py) are the spec, values copied.
A1111_DOCTESTS = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
]


@pytest.mark.parametrize(("text", "expected"), A1111_DOCTESTS, ids=[t for t, _ in A1111_DOCTESTS])
def test_parse_prompt_attention_reproduces_a1111_doctests(text, expected):
    # Exact equality, floats included: the products are formed in A1111's order.
    assert prompts.parse_prompt_attention(text) == expected


# Further cases, stated by hand from the rules in the issue and A1111's docstring.
HAND_CASES = [
    ("", [("", 1.0)]),
    ("[x]", [("x", 1 / 1.1)]),
    ("[[x]]", [("x", (1 / 1.1) ** 2)]),
    ("(x:1.5)", [("x", 1.5)]),
    ("(x: 1.5 )", [("x", 1.5)]),  # spaces around the number are allowed
    ("((x:1.5))", [("x", 1.5 * 1.1)]),  # nesting multiplies
    ("a (b [c] d) e", [("a ", 1.0), ("b ", 1.1), ("c", 1.0), (" d", 1.1), (" e", 1.0)]),
    ("[unclosed (both", [("unclosed ", 1 / 1.1), ("both", 1.0)]),  # open brackets run to the end
    ("a \\\\ b", [("a \\ b", 1.0)]),  # \\ is a literal backslash
    ("a \\b", [("a b", 1.0)]),  # any other backslash is dropped
    ("stray ) and ] closers", [("stray ) and ] closers", 1.0)]),
    ("x:1.5) without an opening", [("x:1.5) without an opening", 1.0)]),
    ("[x:1.5]", [("x:1.5", 1 / 1.1)]),  # an explicit weight needs round brackets
    ("time: noon", [("time: noon", 1.0)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("BREAK first", [("", 1.0), ("BREAK", -1.0), ("first", 1.0)]),
    ("BREAKfast at noon", [("BREAKfast at noon", 1.0)]),  # only the whole word
    # A1111 multiplies the BREAK marker inside brackets too, so it is no longer a break there.
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),
]


@pytest.mark.parametrize(("text", "expected"), HAND_CASES, ids=[t or "<empty>" for t, _ in HAND_CASES])
def test_parse_prompt_attention_rules(text, expected):
    parsed = prompts.parse_prompt_attention(text)
    assert [t for t, _ in parsed] == [t for t, _ in expected]
    assert [w for _, w in parsed] == pytest.approx([w for _, w in expected], rel=1e-12)


@pytest.mark.parametrize("text", ["(x:1.2.3)", "(x:.)", "a (b:1..5) c"])
def test_parse_prompt_attention_rejects_a_weight_that_is_not_a_number(text):
    with pytest.raises(ValueError, match="is not a weight"):
        prompts.parse_prompt_attention(text)


# ----------------------------------------------------------------------------------------------
# LoRA tags
@pytest.mark.parametrize(
    ("prompt", "text", "tags"),
    [
        ("a cat", "a cat", []),
        ("a cat <lora:fur>", "a cat ", [LoraTag("fur", 1.0, 1.0)]),
        ("<lora:fur:0.8>, a cat", ", a cat", [LoraTag("fur", 0.8, 0.8)]),
        ("a <lora:my style v1.5:-0.25>cat", "a cat", [LoraTag("my style v1.5", -0.25, -0.25)]),
        ("a cat <lora:fur:0.8:0.5>", "a cat ", [LoraTag("fur", 0.8, 0.5)]),
        ("a cat <lora:fur:unet=0.5>", "a cat ", [LoraTag("fur", 1.0, 0.5)]),
        ("a cat <lora:fur:te=0.2:unet=0.6>", "a cat ", [LoraTag("fur", 0.2, 0.6)]),
        (
            "(a <lora:fur:0.5> cat) <lyco:light:1.2>",
            "(a  cat) ",
            [LoraTag("fur", 0.5, 0.5), LoraTag("light", 1.2, 1.2)],
        ),
        ("a cat <3 and <tags without colons>", "a cat <3 and <tags without colons>", []),
    ],
)
def test_extract_lora_tags(prompt, text, tags):
    assert prompts.extract_lora_tags(prompt) == (text, tags)


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("a cat <lora:fur:strong>", "'strong' is not a weight"),
        ("a cat <lora:fur:0.8:lots>", "'lots' is not a weight"),
        ("a cat <lora:fur:nan>", "'nan' is not a weight"),
        ("a cat <lora:fur:te=x>", "'x' is not a weight"),
        ("a cat <lora: :0.8>", "Malformed LoRA tag"),
        ("a cat <lora:fur:1:1:8>", "Malformed LoRA tag"),
        ("a cat <lora:fur:dyn=8>", "Malformed LoRA tag"),
        ("a cat <hypernet:fur:1>", "Unsupported tag '<hypernet:fur:1>'"),
    ],
)
def test_extract_lora_tags_rejects_malformed_tags(prompt, message):
    with pytest.raises(ValueError, match=message):
        prompts.extract_lora_tags(prompt)


# ----------------------------------------------------------------------------------------------
# Windowing
@pytest.fixture(scope="module")
def sd15_tokenizer(hub_layouts):
    return CLIPTokenizer.from_pretrained(hub_layouts / "stable-diffusion-v1-5" / "tokenizer")


@pytest.fixture(scope="module")
def sd2_tokenizer(hub_layouts):
    return CLIPTokenizer.from_pretrained(hub_layouts / "stable-diffusion-2-1" / "tokenizer")


BOS, EOS, SD2_PAD = 49406, 49407, 0
CAT, DOG, COMMA, RED = 2368, 1929, 267, 736  # 'cat</w>', 'dog</w>', ',</w>', 'red</w>'


def test_token_ids_used_below(sd15_tokenizer, sd2_tokenizer):
    for tokenizer in (sd15_tokenizer, sd2_tokenizer):
        assert tokenizer("cat dog , red", add_special_tokens=False)["input_ids"] == [CAT, DOG, COMMA, RED]
        assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (BOS, EOS)
    assert sd2_tokenizer.pad_token_id == SD2_PAD and sd15_tokenizer.pad_token_id == EOS


def window(tokens: list[int], weights: list[float] | None = None, *, pad: int = EOS, length: int = 77) -> TokenWindow:
    """The expected window, written out: BOS, tokens, EOS, padding."""
    filler = length - 2 - len(tokens)
    weights = [1.0] * len(tokens) if weights is None else weights
    return TokenWindow((BOS, *tokens, EOS, *[pad] * filler), (1.0, *weights, 1.0, *[1.0] * filler))


@pytest.mark.parametrize("prompt", ["a watercolor lighthouse at dawn, soft light", "", "time: noon; x:1.5) ]"])
@pytest.mark.parametrize(("layout", "pad"), [("stable-diffusion-v1-5", EOS), ("stable-diffusion-2-1", SD2_PAD)])
def test_short_prompt_without_brackets_is_today_s_single_window(hub_layouts, layout, pad, prompt):
    # The encoding before emphasis existed: the whole prompt tokenized at
    # once, BOS + tokens + EOS, padded with the tokenizer's pad token (EOS if it has none).
    tokenizer = CLIPTokenizer.from_pretrained(hub_layouts / layout / "tokenizer")
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert prompts.token_windows(tokenizer, prompt) == [window(ids, pad=pad)]
    assert prompts.empty_window(tokenizer) == window([], pad=pad)


def test_weights_follow_every_token_of_an_emphasised_word(sd15_tokenizer):
    # 'photorealistic' is two tokens; both carry the weight 1.5.
    photo, realistic = sd15_tokenizer("photorealistic", add_special_tokens=False)["input_ids"]
    windows = prompts.token_windows(sd15_tokenizer, "(photorealistic:1.5) red [cat]")
    assert windows == [window([photo, realistic, RED, CAT], [1.5, 1.5, 1.0, 1 / 1.1])]


def test_a_prompt_of_exactly_one_window_fills_it(sd15_tokenizer):
    assert prompts.token_windows(sd15_tokenizer, " ".join(["cat"] * 75)) == [window([CAT] * 75)]
    assert prompts.token_windows(sd15_tokenizer, " ".join(["cat"] * 76)) == [window([CAT] * 75), window([CAT])]


@pytest.mark.parametrize(
    ("cats", "dogs", "first", "second"),
    [
        # The comma is token 61 of 75: 15 tokens from the end (<= 20): the window ends after it.
        (60, 20, [CAT] * 60 + [COMMA], [DOG] * 20),
        # Exactly 20 from the end still moves.
        (55, 25, [CAT] * 55 + [COMMA], [DOG] * 25),
        # 21 from the end: too far, the window is cut at token 75.
        (54, 26, [CAT] * 54 + [COMMA] + [DOG] * 20, [DOG] * 6),
        # The comma is the last token of a full window: nothing to move.
        (74, 3, [CAT] * 74 + [COMMA], [DOG] * 3),
    ],
)
def test_a_full_window_ends_at_a_comma_within_20_tokens_of_its_end(sd15_tokenizer, cats, dogs, first, second):
    prompt = " ".join(["cat"] * cats) + ", " + " ".join(["dog"] * dogs)
    assert prompts.token_windows(sd15_tokenizer, prompt) == [window(first), window(second)]


def test_a_comma_that_arrives_at_a_full_window_opens_the_next(sd15_tokenizer):
    prompt = " ".join(["cat"] * 75) + ", " + " ".join(["dog"] * 5)
    assert prompts.token_windows(sd15_tokenizer, prompt) == [window([CAT] * 75), window([COMMA] + [DOG] * 5)]


def test_a_comma_that_opens_a_window_is_not_a_backtrack_point(sd15_tokenizer):
    # Short windows (14 tokens, as the bundled tiny model's), where 20 covers a whole window.
    prompt = " ".join(["cat"] * 14) + ", " + " ".join(["dog"] * 14)
    expected = [window([CAT] * 14, length=16), window([COMMA] + [DOG] * 13, length=16), window([DOG], length=16)]
    assert prompts.token_windows(sd15_tokenizer, prompt, length=16) == expected


def test_comma_backtrack_zero_cuts_at_the_window_end(sd15_tokenizer):
    prompt = " ".join(["cat"] * 60) + ", " + " ".join(["dog"] * 20)
    windows = prompts.token_windows(sd15_tokenizer, prompt, comma_backtrack=0)
    assert windows == [window([CAT] * 60 + [COMMA] + [DOG] * 14), window([DOG] * 6)]


def test_backtracked_tokens_keep_their_weights(sd15_tokenizer):
    prompt = " ".join(["cat"] * 70) + ", (dog dog dog dog dog dog:1.3)"
    windows = prompts.token_windows(sd15_tokenizer, prompt)
    assert windows == [window([CAT] * 70 + [COMMA]), window([DOG] * 6, [1.3] * 6)]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("cat BREAK dog", [window([CAT]), window([DOG])]),
        ("cat, red BREAK BREAK dog", [window([CAT, COMMA, RED]), window([]), window([DOG])]),
        ("BREAK dog", [window([]), window([DOG])]),
        ("cat BREAK", [window([CAT])]),
        ("BREAK", [window([])]),
        ("cat\nBREAK\ndog", [window([CAT]), window([DOG])]),
        # Inside brackets the marker's weight is -1.1, not -1: A1111 then encodes the word "break".
        ("(cat BREAK dog)", [window([CAT, 2568, DOG], [1.1, -1.1, 1.1])]),
    ],
)
def test_break_starts_a_new_window(sd15_tokenizer, prompt, expected):
    assert prompts.token_windows(sd15_tokenizer, prompt) == expected


def test_break_in_a_long_prompt_and_sd2_padding(sd2_tokenizer):
    prompt = " ".join(["cat"] * 80) + " BREAK red"
    expected = [window([CAT] * 75, pad=SD2_PAD), window([CAT] * 5, pad=SD2_PAD), window([RED], pad=SD2_PAD)]
    assert prompts.token_windows(sd2_tokenizer, prompt) == expected


# REFERENCE (test-only): A1111's FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line
# (modules/sd_hijack_clip.py) ported line by line, without textual-inversion embeddings, plus the
# SD 2 padding step of its process_tokens. It checks our windowing on many generated prompts.
def a1111_tokenize_line(tokenizer, vocab, line, *, chunk_length, comma_padding_backtrack, id_pad):
    parsed = prompts.parse_prompt_attention(line)
    tokenized = tokenizer([text for text, _ in parsed], truncation=False, add_special_tokens=False)["input_ids"]
    id_start, id_end = tokenizer.bos_token_id, tokenizer.eos_token_id
    comma_token = vocab.get(",</w>", None)
    chunks = []
    chunk_tokens, chunk_multipliers = [], []
    last_comma = -1

    def next_chunk():
        nonlocal chunk_tokens, chunk_multipliers, last_comma
        to_add = chunk_length - len(chunk_tokens)
        if to_add > 0:
            chunk_tokens += [id_end] * to_add
            chunk_multipliers += [1.0] * to_add
        chunks.append(([id_start] + chunk_tokens + [id_end], [1.0] + chunk_multipliers + [1.0]))
        last_comma = -1
        chunk_tokens, chunk_multipliers = [], []

    for tokens, (text, weight) in zip(tokenized, parsed):
        if text == "BREAK" and weight == -1:
            next_chunk()
            continue
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == comma_token:
                last_comma = len(chunk_tokens)
            elif (
                comma_padding_backtrack != 0
                and len(chunk_tokens) == chunk_length
                and last_comma != -1
                and len(chunk_tokens) - last_comma <= comma_padding_backtrack
            ):
                break_location = last_comma + 1
                reloc_tokens = chunk_tokens[break_location:]
                reloc_mults = chunk_multipliers[break_location:]
                chunk_tokens = chunk_tokens[:break_location]
                chunk_multipliers = chunk_multipliers[:break_location]
                next_chunk()
                chunk_tokens = reloc_tokens
                chunk_multipliers = reloc_mults
            if len(chunk_tokens) == chunk_length:
                next_chunk()
            chunk_tokens.append(token)
            chunk_multipliers.append(weight)
            position += 1
    if chunk_tokens or not chunks:
        next_chunk()

    result = []
    for ids, multipliers in chunks:
        if id_end != id_pad:  # SD 2: everything after the first EOS becomes id_pad
            first_end = ids.index(id_end)
            ids = ids[: first_end + 1] + [id_pad] * (len(ids) - first_end - 1)
        result.append(TokenWindow(tuple(ids), tuple(multipliers)))
    return result


def generated_prompt(rng: random.Random) -> str:
    pieces = ["cat", "dog", "red", "photorealistic", ",", ",", "(", ")", "[", "]", ":1.3)", "BREAK", "\\("]
    weights = [8, 8, 8, 3, 6, 6, 1, 1, 1, 1, 1, 0.3, 0.2]
    return " ".join(rng.choices(pieces, weights, k=rng.randrange(0, 200)))


@pytest.mark.parametrize(("length", "backtrack"), [(77, 20), (77, 0), (16, 20), (16, 4)])
def test_windows_match_the_ported_a1111_reference(sd15_tokenizer, sd2_tokenizer, length, backtrack):
    rng = random.Random(length * 100 + backtrack)
    vocabularies = {EOS: sd15_tokenizer.get_vocab(), 0: sd2_tokenizer.get_vocab()}  # get_vocab() is slow: once
    for _ in range(150):
        prompt = generated_prompt(rng)
        for tokenizer, id_pad in ((sd15_tokenizer, EOS), (sd2_tokenizer, 0)):
            ours = prompts.token_windows(tokenizer, prompt, length=length, comma_backtrack=backtrack)
            reference = a1111_tokenize_line(
                tokenizer, vocabularies[id_pad], prompt,
                chunk_length=length - 2, comma_padding_backtrack=backtrack, id_pad=id_pad,
            )
            assert ours == reference, prompt


# ----------------------------------------------------------------------------------------------
# The emphasis rule
def test_apply_emphasis_matches_the_rule_to_1e5():
    hidden = torch.randn(3, 77, 32)
    weights = torch.ones(3, 77)
    weights[0, 1:5] = 1.5
    weights[0, 9] = 1 / 1.1
    weights[2, 3:40] = 0.7
    ours = prompts.apply_emphasis(hidden, weights)

    expected = []
    for z, w in zip(hidden.double(), weights.double()):  # one window at a time, in float64
        weighted = z * w[:, None]
        expected.append(weighted * (z.mean() / weighted.mean()))
    torch.testing.assert_close(ours, torch.stack(expected).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.mean(dim=(1, 2)), hidden.mean(dim=(1, 2)), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours[0], hidden[0])
    # A window of weights 1 next to weighted ones comes back bit for bit.
    assert torch.equal(ours[1], hidden[1])


def test_apply_emphasis_without_weights_returns_the_input():
    hidden = torch.randn(2, 77, 8, dtype=torch.float16)
    assert prompts.apply_emphasis(hidden, torch.ones(2, 77)) is hidden


def test_apply_emphasis_keeps_the_dtype():
    hidden = torch.randn(1, 77, 8, dtype=torch.float16)
    weights = torch.ones(1, 77)
    weights[0, 1] = 1.3
    assert prompts.apply_emphasis(hidden, weights).dtype == torch.float16


def test_apply_emphasis_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"weights \[N, L\]"):
        prompts.apply_emphasis(torch.randn(2, 77, 8), torch.ones(2, 76))
