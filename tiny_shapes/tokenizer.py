"""A CLIP tokenizer for the shapes captions: byte-pair merges learned from the captions themselves.

The bundled model's text encoder is trained from scratch, so it gets its own small vocabulary
instead of CLIP's 49 408 tokens. The files written are CLIP's (``vocab.json`` and ``merges.txt``),
so ``transformers.CLIPTokenizer`` reads them and the pipeline encodes prompts exactly as for SD.
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from transformers import CLIPTokenizer

__all__ = ["learn_bpe_tokenizer"]


def _byte_characters() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values (Radford et al. 2019), which CLIP's BPE runs on.

    Printable Latin-1 bytes stand for themselves; the others (control characters, space, ...) are
    moved to code points 256 and up, so that every token is a visible string.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    return [table[b] for b in range(256)]


def learn_bpe_tokenizer(texts: Iterable[str], folder: str | Path, *, model_max_length: int = 77) -> CLIPTokenizer:
    """Learn byte-pair merges (Sennrich et al. 2016) from ``texts`` and save a CLIP tokenizer to ``folder``.

    The vocabulary is CLIP's layout: the 256 byte symbols, the same with the end-of-word mark
    ``</w>``, the merged symbols in the order learned, then ``<|startoftext|>`` and
    ``<|endoftext|>``. Merging continues until every word of ``texts`` is a single token, so a
    caption costs one token per word; unseen words still encode, byte by byte. Returns the
    ``transformers.CLIPTokenizer`` read back from ``vocab.json`` and ``merges.txt``.
    """
    byte_symbols = _byte_characters()
    # CLIP lower-cases and splits words, single digits and runs of punctuation apart.
    word_counts = Counter(
        word for text in texts for word in re.findall(r"[^\W\d_]+|\d|[^\s\w]+|_+", text.lower())
    )
    spellings = {}
    for word in word_counts:
        symbols = [byte_symbols[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        spellings[word] = symbols
    vocab = byte_symbols + [s + "</w>" for s in byte_symbols]
    merges: list[tuple[str, str]] = []
    while True:
        pair_counts: Counter[tuple[str, str]] = Counter()
        for word, symbols in spellings.items():
            for pair in itertools.pairwise(symbols):
                pair_counts[pair] += word_counts[word]
        if not pair_counts:
            break
        # Most frequent pair; ties broken by the pair itself so the vocabulary is reproducible.
        best = max(pair_counts, key=lambda pair: (pair_counts[pair], pair))
        merges.append(best)
        vocab.append(best[0] + best[1])
        for word, symbols in spellings.items():
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            spellings[word] = merged
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    token_ids = {token: i for i, token in enumerate(vocab)}

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(token_ids, ensure_ascii=False, indent=1), encoding="utf-8")
    merge_lines = "".join(f"{left} {right}\n" for left, right in merges)
    (folder / "merges.txt").write_text("#version: 0.2\n" + merge_lines, encoding="utf-8")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=model_max_length)

