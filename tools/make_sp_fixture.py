#!/usr/bin/env python3
"""Writes tests/fixtures/sp/tok512_ids.txt: expected token ids of a few prompts under the
llama2.c tokenizer.bin vocabulary tok512.bin, computed by a plain Python SentencePiece-style BPE
that shares no code with core/src/tokenizer.c (which uses a heap; this is the textbook loop).

    python3 tools/make_sp_fixture.py [path/to/tok512.bin] [out.txt]

Output: one line per prompt: the prompt escaped (backslash, tab, newline, carriage return and
other control bytes, and bytes outside well-formed UTF-8 as \\xNN; "\\\\", "\\t", "\\n", "\\r"),
a tab, then the ids separated by spaces (no BOS).

The algorithm (llama2.c run.c, plus SentencePiece's rules for special pieces):
  - a space is prepended to non-empty text;
  - the text is cut into UTF-8 code points; a code point that is a vocabulary piece becomes that
    token, otherwise each of its bytes becomes its "<0xNN>" token; a byte outside well-formed
    UTF-8 becomes its "<0xNN>" token on its own;
  - while some adjacent pair concatenates to a piece of the vocabulary, merge the pair whose
    result scores highest (the leftmost such pair on ties);
  - <unk>, <s>, </s> and byte pieces are never looked up, produced by a merge, or merged with a
    neighbour; when two tokens share a piece, the lower id is the one looked up.
"""
import os
import struct
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TOK = os.path.join(ROOT, "..", "shared", "data", "models", "stories260K", "tok512.bin")
DEFAULT_OUT = os.path.join(ROOT, "tests", "fixtures", "sp", "tok512_ids.txt")

PROMPTS = [
    b"Once upon a time, there was a little girl named Lily.",
    b"She loved to play outside in the park with her friends.",
    b"One day, Tom saw a big red ball. He said, \"Can I play with it?\"",
    b"The cat was sad... but then the sun came out! The end.",
    b"Hello world",
    b"a",
    b" ",
    b"  two  spaces  ",
    b"the the the the",
    b"oooo Booo!! ooooooo",  # equal-score pairs: the leftmost merges first
    b"Line one.\nLine two.\n\tTabbed (parens) [brackets] {braces} 100% #1 @home & co; x=y+z*2/3",
    "na\u00efve caf\u00e9 \u65e5\u672c \U0001f642".encode("utf-8"),
    "\u201cQuoted\u201d \u2013 dash \u2014 and it\u2019s \u2026 \u20ac5".encode("utf-8"),
    b"bad \xff\xfe bytes \x80 lone \xe6\x97 cut \xed\xa0\x80 surrogate \xc0\xaf overlong",
    b"\x00nul and \x7f del",
    b"Tim and Sue went to the store. They wanted to buy some candy. The store was very big and "
    b"had lots of toys. Sue saw a pretty doll and wanted it, but Tim said they only had money for "
    b"candy. Sue was sad, so Tim gave her a hug. Then they bought candy and went home happy.",
]


def read_vocab(path):
    data = open(path, "rb").read()
    (max_len,) = struct.unpack_from("<i", data, 0)
    pos = 4
    pieces, scores = [], []
    while pos < len(data):
        score, n = struct.unpack_from("<fi", data, pos)
        pos += 8
        assert 0 <= n <= max_len, "bad token length"
        pieces.append(data[pos:pos + n])
        scores.append(score)
        pos += n
    assert pos == len(data)
    return pieces, scores


def is_byte_piece(p):
    return len(p) == 6 and p.startswith(b"<0x") and p.endswith(b">") and all(
        c in b"0123456789ABCDEF" for c in p[3:5])


def utf8_units(text):
    """Splits bytes into (bytes, valid) units: well-formed code points, or single bad bytes."""
    units, i = [], 0
    while i < len(text):
        for k in (1, 2, 3, 4):
            chunk = text[i:i + k]
            try:
                chunk.decode("utf-8", errors="strict")
            except UnicodeDecodeError:
                continue
            if len(chunk) == k:
                units.append((chunk, True))
                i += k
                break
        else:
            units.append((text[i:i + 1], False))
            i += 1
    return units


def encode(text, pieces, scores):
    lookup = {}
    byte_tok = {}
    for i, p in enumerate(pieces):
        if is_byte_piece(p):
            byte_tok.setdefault(int(p[3:5], 16), i)
        elif i > 2:
            lookup.setdefault(p, i)
    ordinary = set(lookup.values())
    if not text:
        return []
    toks = []
    for unit, valid in utf8_units(b" " + text):
        if valid and unit in lookup:
            toks.append(lookup[unit])
        else:
            toks.extend(byte_tok.get(b, 0) for b in unit)
    while True:
        best, best_at = None, -1
        for j in range(len(toks) - 1):
            if toks[j] not in ordinary or toks[j + 1] not in ordinary:
                continue
            m = lookup.get(pieces[toks[j]] + pieces[toks[j + 1]])
            if m is not None and (best is None or scores[m] > scores[best]):
                best, best_at = m, j
        if best is None:
            return toks
        toks[best_at:best_at + 2] = [best]


def escape(b):
    out = []
    for unit, valid in utf8_units(b):
        if not valid:
            out.append("\\x%02X" % unit[0])
        elif unit == b"\\":
            out.append("\\\\")
        elif unit == b"\t":
            out.append("\\t")
        elif unit == b"\n":
            out.append("\\n")
        elif unit == b"\r":
            out.append("\\r")
        elif len(unit) == 1 and (unit[0] < 0x20 or unit[0] == 0x7F):
            out.append("\\x%02X" % unit[0])
        else:
            out.append(unit.decode("utf-8"))
    return "".join(out)


def main():
    tok = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_TOK
    out = sys.argv[2] if len(sys.argv) > 2 else DEFAULT_OUT
    pieces, scores = read_vocab(tok)
    lines = []
    for p in PROMPTS:
        ids = encode(p, pieces, scores)
        lines.append(escape(p) + "\t" + " ".join(str(i) for i in ids) + "\n")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(lines)
    print("wrote %d prompts to %s" % (len(lines), out))


if __name__ == "__main__":
    main()
