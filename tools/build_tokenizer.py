"""Build the small CLIP BPE tokenizer shipped in `assets/tokenizer/` (vocab.json + merges.txt).

Real CLIP vocabularies are 49k tokens and live on the hub; our tiny and demo models need one that ships
with the project. Like CLIP's, the vocabulary starts with all 256 byte symbols, alone and word-final
(`</w>`), so every prompt tokenizes; the rest are byte-pair merges learned here from a small English word
list in which the demo world's words (colours, shapes, "sks", ...) are frequent enough to be whole tokens.

Run: python tools/build_tokenizer.py [--out assets/tokenizer] [--vocab-size 1000]
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

# Words of the demo world (and of DreamBooth prompts), weighted so each ends as a single token.
DEMO_WORDS = """
a an the of on in with and photo picture drawing image shape shapes sks style
red green blue yellow purple orange pink white black gray grey brown cyan magenta
circle square triangle star heart cross ring diamond hexagon dot
small big large tiny outlined striped filled plain background dog cat
""".split()

# A general word list so ordinary prompts split into sensible pieces rather than single bytes.
COMMON_WORDS = """
time person year way day thing man world life hand part child eye woman place work week case point
number group problem fact be have do say get make go know take see come think look want give use find
tell ask seem feel try leave call good new first last long great little own other old right high
different next early young important few public bad same able to for by from up about into over after
beneath under above between out against during without before through around among very portrait
landscape city street house tree forest mountain river sea sky cloud sun moon night light dark bright
color colour art painting sketch render cinematic detailed high quality best masterpiece realistic
face hair smile dress shirt car bike road garden flower water fire stone wood metal glass paper gold
silver beautiful cute happy sad standing sitting running flying close view top side front back left
""".split()


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def learn_merges(word_counts: dict[str, int], num_merges: int) -> list[tuple[str, str]]:
    """Greedy byte-pair merges over words spelled in byte symbols, the last one carrying `</w>`."""
    byte_symbol = bytes_to_unicode()
    words = {}
    for word, count in word_counts.items():
        symbols = [byte_symbol[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        words[tuple(symbols)] = count
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: collections.Counter = collections.Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        merged = {}
        for symbols, count in words.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = count
        words = merged
    return merges


def build_vocab(vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    symbols = list(bytes_to_unicode().values())
    base = symbols + [s + "</w>" for s in symbols]
    word_counts = {w: 1 for w in COMMON_WORDS}
    word_counts.update({w: 1000 for w in DEMO_WORDS})
    merges = learn_merges(word_counts, vocab_size - len(base) - 2)
    tokens = base + ["".join(pair) for pair in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "assets" / "tokenizer")
    parser.add_argument("--vocab-size", type=int, default=1000)
    args = parser.parse_args()
    vocab, merges = build_vocab(args.vocab_size)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (args.out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True}
    (args.out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {args.out}")


if __name__ == "__main__":
    main()
