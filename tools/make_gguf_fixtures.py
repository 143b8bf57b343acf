#!/usr/bin/env python3
"""Writes the GGUF test fixtures under tests/fixtures/gguf/ (read by tests/c/test_gguf.c).

  synth.gguf        a small GGUF v3 file written by the gguf package: one metadata key of every
                    value type, arrays of every element type (strings included), alignment 64,
                    and F32, F16, BF16, I8, I32, Q8_0, Q4_0, Q4_1 and Q6_K tensors.
  synth.txt         what the gguf package reads back from synth.gguf (the format below).
  synth_ref.bin     the values of every F32/F16/BF16/Q8_0/Q4_0/Q4_1 tensor of synth.gguf as the
                    gguf package dequantizes them: f32 little-endian, tensors in file order.
  tiny_random_llama.txt  the same description of ../shared/data/models/tiny-random-gguf/
                    tiny-random-llama.gguf.

Description format, one record a line, fields separated by one space, strings hex-encoded
("-" for an empty string):
  version V / alignment A / keys N / tensors N
  kv NAME TYPE VALUE            scalar keys (TYPE is moonshard's: u8 .. f64, bool, string)
  kv NAME array ELEMTYPE N HASH arrays: HASH is FNV-1a 64 (hex) over the elements, each
                                a number as 8 bytes (int64 or double bits, little-endian) or a
                                string as its 8-byte length then its bytes
  elem NAME J VALUE             a few elements of each array
  tensor NAME GGMLTYPE NDIM D0 .. OFFSET NBYTES SUM
                                row-major dims, absolute data offset, bytes, and the sum of the
                                dequantized values in float64 ("-" when moonshard does not load it)

Usage: python3 tools/make_gguf_fixtures.py   (needs: pip install gguf numpy)
"""
import os
import struct
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q, GGUFValueType as V

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "gguf")
TINY = os.path.join(ROOT, "..", "shared", "data", "models", "tiny-random-gguf", "tiny-random-llama.gguf")

TYPE_NAMES = {V.UINT8: "u8", V.INT8: "i8", V.UINT16: "u16", V.INT16: "i16", V.UINT32: "u32",
              V.INT32: "i32", V.FLOAT32: "f32", V.BOOL: "bool", V.STRING: "string",
              V.ARRAY: "array", V.UINT64: "u64", V.INT64: "i64", V.FLOAT64: "f64"}
FLOATS = (V.FLOAT32, V.FLOAT64)
LOADED = {Q.F32, Q.F16, Q.BF16, Q.I8, Q.I32, Q.Q8_0, Q.Q4_0, Q.Q4_1}


def fnv(h, data):
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def hexs(b):
    return b.hex() if b else "-"


def scalar_text(vtype, v):
    if vtype == V.STRING:
        return hexs(bytes(v))
    if vtype in FLOATS:
        return repr(float(v))
    return str(int(v))


def element_bytes(vtype, v):
    if vtype == V.STRING:
        b = bytes(v)
        return struct.pack("<Q", len(b)) + b
    if vtype in FLOATS:
        return struct.pack("<d", float(v))
    return struct.pack("<q", int(v)) if int(v) < 2**63 else struct.pack("<Q", int(v))


def values(reader, field):
    """The field's values: numbers or bytes."""
    out = []
    for i in field.data:
        part = field.parts[i]
        out.append(bytes(part) if field.types[-1] == V.STRING else part[0].item())
    return out


def tensor_values(t):
    if t.tensor_type in (Q.F32, Q.F16, Q.I8, Q.I32):
        return np.asarray(t.data, dtype=np.float64).ravel()
    if t.tensor_type == Q.BF16:
        u = np.asarray(t.data).view(np.uint16).astype(np.uint32) << 16
        return u.view(np.float32).astype(np.float64).ravel()
    return gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float64).ravel()


def describe(path):
    r = gguf.GGUFReader(path)
    lines = []
    version = int(r.fields["GGUF.version"].parts[-1][0])
    align = r.alignment
    kvs = [(k, f) for k, f in r.fields.items() if not k.startswith("GGUF.")]
    lines += [f"version {version}", f"alignment {align}", f"keys {len(kvs)}", f"tensors {len(r.tensors)}"]
    for name, f in kvs:
        t0 = f.types[0]
        vals = values(r, f)
        if t0 == V.ARRAY:
            et = f.types[-1]
            h = 0xCBF29CE484222325
            for v in vals:
                h = fnv(h, element_bytes(et, v))
            lines.append(f"kv {name} array {TYPE_NAMES[et]} {len(vals)} {h:016x}")
            picks = sorted({0, 1, 2, len(vals) // 2, len(vals) - 1} & set(range(len(vals))))
            for j in picks:
                lines.append(f"elem {name} {j} {scalar_text(et, vals[j])}")
        else:
            lines.append(f"kv {name} {TYPE_NAMES[t0]} {scalar_text(t0, vals[0])}")
    refs = []
    for t in r.tensors:
        shape = [int(d) for d in reversed(list(t.shape))]
        total = "-"
        if t.tensor_type in LOADED:
            v = tensor_values(t)
            total = repr(float(v.sum()))
            if t.tensor_type not in (Q.I8, Q.I32):
                refs.append(v.astype(np.float32))
        lines.append(f"tensor {t.name} {t.tensor_type.name} {len(shape)} {' '.join(map(str, shape))} "
                     f"{int(t.data_offset)} {int(t.n_bytes)} {total}")
    return "\n".join(lines) + "\n", refs


def write_synth(path):
    rng = np.random.default_rng(20240611)
    w = gguf.GGUFWriter(path, arch="synth")
    w.add_custom_alignment(64)
    w.add_key_value("test.u8", 200, V.UINT8)
    w.add_key_value("test.i8", -100, V.INT8)
    w.add_key_value("test.u16", 60000, V.UINT16)
    w.add_key_value("test.i16", -30000, V.INT16)
    w.add_key_value("test.u32", 4000000000, V.UINT32)
    w.add_key_value("test.i32", -2000000000, V.INT32)
    w.add_key_value("test.f32", 3.5, V.FLOAT32)
    w.add_key_value("test.bool", True, V.BOOL)
    w.add_key_value("test.string", "h\u00e9llo, w\u00f6rld \U0001F600", V.STRING)
    w.add_key_value("test.empty_string", "", V.STRING)
    w.add_key_value("test.u64", 2**63 + 5, V.UINT64)
    w.add_key_value("test.u64_small", 123456789012, V.UINT64)
    w.add_key_value("test.i64", -(2**40) - 7, V.INT64)
    w.add_key_value("test.f64", 1.0 / 3.0, V.FLOAT64)
    w.add_key_value("arr.u8", [1, 2, 255], V.ARRAY, V.UINT8)
    w.add_key_value("arr.i8", [-128, 0, 127], V.ARRAY, V.INT8)
    w.add_key_value("arr.u16", [0, 65535], V.ARRAY, V.UINT16)
    w.add_key_value("arr.i16", [-32768, 32767, 5], V.ARRAY, V.INT16)
    w.add_key_value("arr.u32", [4294967295, 1], V.ARRAY, V.UINT32)
    w.add_key_value("arr.i32", [-1, 2, -3, 4, -5], V.ARRAY, V.INT32)
    w.add_key_value("arr.f32", [0.25, -1.5, 1e30], V.ARRAY, V.FLOAT32)
    w.add_key_value("arr.bool", [True, False, True], V.ARRAY, V.BOOL)
    w.add_key_value("arr.u64", [2**64 - 1, 7], V.ARRAY, V.UINT64)
    w.add_key_value("arr.i64", [-(2**62), 2**62], V.ARRAY, V.INT64)
    w.add_key_value("arr.f64", [2.0**-30, -1e300], V.ARRAY, V.FLOAT64)
    w.add_key_value("arr.string", ["a", "", "\u00fcn\u00ef", "x" * 300, "<|im_start|>"], V.ARRAY, V.STRING)

    def add(name, rows, cols, qtype):
        x = rng.standard_normal((rows, cols)).astype(np.float32)
        if qtype == Q.F32:
            w.add_tensor(name, x)
        elif qtype == Q.F16:
            w.add_tensor(name, x.astype(np.float16))
        elif qtype in (Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1):
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
        else:  # the gguf package cannot quantize k-quants: random blocks of the right size
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            w.add_tensor(name, rng.integers(0, 256, (rows, cols // block * size), dtype=np.uint8), raw_dtype=qtype)

    add("t.f32", 3, 5, Q.F32)
    add("t.f16", 4, 8, Q.F16)
    add("t.bf16", 2, 16, Q.BF16)
    add("t.q8_0", 3, 64, Q.Q8_0)
    add("t.q4_0", 2, 96, Q.Q4_0)
    add("t.q4_1", 4, 32, Q.Q4_1)
    add("t.q6_k", 1, 256, Q.Q6_K)
    w.add_tensor("t.i8", np.arange(-6, 6, dtype=np.int8).reshape(3, 4))
    w.add_tensor("t.i32", np.arange(-3, 3, dtype=np.int32) * 100000)
    w.add_tensor("t.f32_3d", rng.standard_normal((2, 3, 4)).astype(np.float32))
    w.add_tensor("t.f32_4d", rng.standard_normal((2, 1, 3, 2)).astype(np.float32))
    add("blk.0.attn_q.weight", 2, 256, Q.Q4_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    os.makedirs(OUT, exist_ok=True)
    synth = os.path.join(OUT, "synth.gguf")
    write_synth(synth)
    text, refs = describe(synth)
    with open(os.path.join(OUT, "synth.txt"), "w") as f:
        f.write(text)
    with open(os.path.join(OUT, "synth_ref.bin"), "wb") as f:
        for v in refs:
            f.write(v.astype("<f4").tobytes())
    if not os.path.exists(TINY):
        sys.exit(f"missing {TINY}")
    text, _ = describe(TINY)
    with open(os.path.join(OUT, "tiny_random_llama.txt"), "w") as f:
        f.write(text)
    for name in sorted(os.listdir(OUT)):
        print(f"{name}: {os.path.getsize(os.path.join(OUT, name))} bytes")


if __name__ == "__main__":
    main()
