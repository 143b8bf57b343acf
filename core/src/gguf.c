/* gguf.c: GGUF (v2, v3) reader: metadata, tensor infos and zero-copy tensor views.
 *
 * Layout (little-endian): "GGUF", u32 version, u64 n_tensors, u64 n_kv,
 *   n_kv x { string key, u32 type, value },
 *   n_tensors x { string name, u32 n_dims, u64 dims[n_dims] (innermost first), u32 ggml type,
 *                 u64 offset (relative to the data section) },
 *   padding to general.alignment, data section.
 * A string is u64 length + bytes; an array is u32 element type, u64 count, elements.
 * Everything is checked against the file's size before it is read.
 */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { GGUF_MAX_DIMS = 4, GGUF_DEFAULT_ALIGNMENT = 32 };

/* Smallest encodings, used to reject counts the file cannot hold before allocating for them. */
enum {
  MIN_KV_BYTES = 8 + 4 + 1,        /* empty key, type, one-byte value */
  MIN_TENSOR_BYTES = 8 + 4 + 4 + 8 /* empty name, n_dims 0, type, offset */
};

typedef struct {
  char *name;
  int type;             /* msh_gguf_type */
  int elem_type;        /* arrays: element type */
  uint64_t n;           /* strings: byte length; arrays: element count */
  uint64_t at;          /* file offset of the value (strings: of the bytes; arrays: of element 0) */
  uint64_t *str_at;     /* arrays of strings: file offset of each element's bytes */
} gguf_kv;

typedef struct {
  char *name;
  int type;                   /* ggml type */
  int ndim;
  int64_t shape[GGUF_MAX_DIMS]; /* row-major: shape[ndim - 1] is GGUF's dims[0] */
  uint64_t offset;            /* absolute file offset */
  uint64_t nbytes;
} gguf_tensor;

/* Open-addressing index from names to positions in an array of names. */
typedef struct {
  int32_t *slots; /* -1 empty, else an index */
  uint32_t mask;
} name_index;

struct msh_gguf {
  msh_file *file;
  const uint8_t *base;
  uint64_t size;
  uint32_t version;
  uint32_t alignment;
  int n_kv;
  int n_tensors;
  gguf_kv *kv;
  gguf_tensor *tensors;
  name_index kv_index;
  name_index tensor_index;
};

/* ------------------------------------------------------------------------------ ggml types */

typedef struct {
  const char *name;
  uint32_t block;  /* elements per block; 0 for numbers ggml no longer uses */
  uint32_t bytes;  /* bytes per block */
} ggml_type_info;

static const ggml_type_info ggml_types[] = {
    [0] = {"F32", 1, 4},        [1] = {"F16", 1, 2},        [2] = {"Q4_0", 32, 18},
    [3] = {"Q4_1", 32, 20},     [6] = {"Q5_0", 32, 22},     [7] = {"Q5_1", 32, 24},
    [8] = {"Q8_0", 32, 34},     [9] = {"Q8_1", 32, 40},     [10] = {"Q2_K", 256, 84},
    [11] = {"Q3_K", 256, 110},  [12] = {"Q4_K", 256, 144},  [13] = {"Q5_K", 256, 176},
    [14] = {"Q6_K", 256, 210},  [15] = {"Q8_K", 256, 292},  [16] = {"IQ2_XXS", 256, 66},
    [17] = {"IQ2_XS", 256, 74}, [18] = {"IQ3_XXS", 256, 98}, [19] = {"IQ1_S", 256, 50},
    [20] = {"IQ4_NL", 32, 18},  [21] = {"IQ3_S", 256, 110}, [22] = {"IQ2_S", 256, 82},
    [23] = {"IQ4_XS", 256, 136}, [24] = {"I8", 1, 1},       [25] = {"I16", 1, 2},
    [26] = {"I32", 1, 4},       [27] = {"I64", 1, 8},       [28] = {"F64", 1, 8},
    [29] = {"IQ1_M", 256, 56},  [30] = {"BF16", 1, 2},      [34] = {"TQ1_0", 256, 54},
    [35] = {"TQ2_0", 256, 66},  [39] = {"MXFP4", 32, 17},
};
enum { GGML_TYPE_SLOTS = (int)(sizeof ggml_types / sizeof ggml_types[0]) };

static const ggml_type_info *ggml_type(int t) {
  if (t < 0 || t >= GGML_TYPE_SLOTS || !ggml_types[t].block) return NULL;
  return &ggml_types[t];
}

const char *msh_gguf_ggml_type_name(int t) {
  const ggml_type_info *ti = ggml_type(t);
  return ti ? ti->name : "?";
}

static const char *const value_type_names[] = {"u8",  "i8",   "u16",    "i16",   "u32", "i32", "f32",
                                               "bool", "string", "array", "u64", "i64", "f64"};
static const uint8_t value_type_sizes[] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};

static const char *value_type_name(int t) {
  return (t >= 0 && t <= MSH_GGUF_F64) ? value_type_names[t] : "?";
}

/* ---------------------------------------------------------------------------- name index */

static uint32_t hash_name(const char *s) {
  uint32_t h = 2166136261u; /* FNV-1a */
  for (; *s; s++) h = (h ^ (uint8_t)*s) * 16777619u;
  return h;
}

/* An empty index with room for n names. */
static msh_status index_init(name_index *ix, int n) {
  size_t cap = 8;
  while (cap < (size_t)n * 2) cap <<= 1;
  ix->slots = malloc(sizeof *ix->slots * cap);
  if (!ix->slots) return MSH_FAIL(MSH_ENOMEM, "out of memory");
  memset(ix->slots, 0xff, sizeof *ix->slots * cap);
  ix->mask = (uint32_t)(cap - 1);
  return MSH_OK;
}

typedef const char *(*name_of_fn)(const void *owner, int i);

/* The slot holding name, or the empty slot where it would go. */
static uint32_t index_slot(const name_index *ix, const char *name, name_of_fn name_of, const void *owner) {
  uint32_t h = hash_name(name) & ix->mask;
  while (ix->slots[h] >= 0 && strcmp(name_of(owner, ix->slots[h]), name) != 0) h = (h + 1) & ix->mask;
  return h;
}

/* Index of name, or -1. */
static int index_find(const name_index *ix, const char *name, name_of_fn name_of, const void *owner) {
  return ix->slots[index_slot(ix, name, name_of, owner)];
}

/* Adds name as index i; returns 0, or -1 when the name is already there. */
static int index_add(name_index *ix, const char *name, int i, name_of_fn name_of, const void *owner) {
  uint32_t h = index_slot(ix, name, name_of, owner);
  if (ix->slots[h] >= 0) return -1;
  ix->slots[h] = i;
  return 0;
}

static const char *kv_name_at(const void *g, int i) { return ((const msh_gguf *)g)->kv[i].name; }
static const char *tensor_name_at(const void *g, int i) { return ((const msh_gguf *)g)->tensors[i].name; }

/* --------------------------------------------------------------------------------- reader */

typedef struct {
  const uint8_t *base;
  uint64_t size;
  uint64_t pos;
  const char *path;
} reader;

static msh_status truncated(const reader *r, uint64_t need, const char *what) {
  return MSH_FAIL(MSH_EFORMAT, "'%s': truncated: %s needs %llu bytes at offset %llu, but the file has %llu bytes",
                  r->path, what, (unsigned long long)need, (unsigned long long)r->pos,
                  (unsigned long long)r->size);
}

static uint64_t remaining(const reader *r) { return r->size - r->pos; }

static msh_status read_bytes(reader *r, void *dst, uint64_t n, const char *what) {
  if (n > remaining(r)) return truncated(r, n, what);
  memcpy(dst, r->base + r->pos, (size_t)n);
  r->pos += n;
  return MSH_OK;
}

static msh_status read_u32(reader *r, uint32_t *v, const char *what) {
  uint8_t b[4] = {0};
  msh_status s = read_bytes(r, b, 4, what);
  if (s == MSH_OK) *v = (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
  return s;
}

static uint64_t load_u64(const uint8_t *b) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; i--) v = v << 8 | b[i];
  return v;
}

static msh_status read_u64(reader *r, uint64_t *v, const char *what) {
  uint8_t b[8] = {0};
  msh_status s = read_bytes(r, b, 8, what);
  if (s == MSH_OK) *v = load_u64(b);
  return s;
}

/* A string's length and the offset of its bytes; the reader moves past it. */
static msh_status read_string(reader *r, uint64_t *len, uint64_t *at, const char *what) {
  uint64_t n;
  msh_status s = read_u64(r, &n, what);
  if (s != MSH_OK) return s;
  if (n > remaining(r))
    return MSH_FAIL(MSH_EFORMAT, "'%s': %s has length %llu at offset %llu, past the end of the file (%llu bytes)",
                    r->path, what, (unsigned long long)n, (unsigned long long)(r->pos - 8),
                    (unsigned long long)r->size);
  *len = n;
  *at = r->pos;
  r->pos += n;
  return MSH_OK;
}

static char *copy_name(const reader *r, uint64_t at, uint64_t len) {
  char *s = malloc((size_t)len + 1);
  if (!s) return NULL;
  memcpy(s, r->base + at, (size_t)len);
  s[len] = '\0';
  return s;
}

/* ------------------------------------------------------------------------------- metadata */

static msh_status read_value(reader *r, gguf_kv *kv, const char *key) {
  char what[320];
  if (kv->type == MSH_GGUF_STRING) {
    snprintf(what, sizeof what, "the string value of key '%s'", key);
    return read_string(r, &kv->n, &kv->at, what);
  }
  if (kv->type != MSH_GGUF_ARRAY) {
    snprintf(what, sizeof what, "the %s value of key '%s'", value_type_name(kv->type), key);
    kv->at = r->pos;
    if (value_type_sizes[kv->type] > remaining(r)) return truncated(r, value_type_sizes[kv->type], what);
    r->pos += value_type_sizes[kv->type];
    return MSH_OK;
  }
  snprintf(what, sizeof what, "the array header of key '%s'", key);
  uint32_t et = 0;
  msh_status s = read_u32(r, &et, what);
  if (s == MSH_OK) s = read_u64(r, &kv->n, what);
  if (s != MSH_OK) return s;
  if (et > MSH_GGUF_F64)
    return MSH_FAIL(MSH_EFORMAT, "'%s': key '%s' is an array of unknown type %u", r->path, key, et);
  if (et == MSH_GGUF_ARRAY)
    return MSH_FAIL(MSH_EUNSUPPORTED, "'%s': key '%s' is an array of arrays, which moonshard does not read",
                    r->path, key);
  kv->elem_type = (int)et;
  kv->at = r->pos;
  if (et != MSH_GGUF_STRING) {
    uint64_t es = value_type_sizes[et];
    if (kv->n > remaining(r) / es)
      return MSH_FAIL(MSH_EFORMAT, "'%s': key '%s' is an array of %llu %s values (%llu bytes each) at offset %llu, past the end of the file (%llu bytes)",
                      r->path, key, (unsigned long long)kv->n, value_type_name((int)et),
                      (unsigned long long)es, (unsigned long long)r->pos, (unsigned long long)r->size);
    r->pos += kv->n * es;
    return MSH_OK;
  }
  if (kv->n > remaining(r) / 8)
    return MSH_FAIL(MSH_EFORMAT, "'%s': key '%s' is an array of %llu strings at offset %llu, more than the file (%llu bytes) can hold",
                    r->path, key, (unsigned long long)kv->n, (unsigned long long)r->pos,
                    (unsigned long long)r->size);
  kv->str_at = malloc(sizeof *kv->str_at * (size_t)(kv->n ? kv->n : 1));
  if (!kv->str_at) return MSH_FAIL(MSH_ENOMEM, "out of memory");
  for (uint64_t j = 0; j < kv->n; j++) {
    uint64_t len;
    snprintf(what, sizeof what, "string %llu of key '%s'", (unsigned long long)j, key);
    s = read_string(r, &len, &kv->str_at[j], what);
    if (s != MSH_OK) return s;
  }
  return MSH_OK;
}

static msh_status read_kvs(msh_gguf *g, reader *r) {
  for (int i = 0; i < g->n_kv; i++) {
    gguf_kv *kv = &g->kv[i];
    char what[64];
    uint64_t len = 0, at = 0;
    uint32_t type = 0;
    snprintf(what, sizeof what, "the name of key %d", i);
    msh_status s = read_string(r, &len, &at, what);
    if (s != MSH_OK) return s;
    if (!(kv->name = copy_name(r, at, len))) return MSH_FAIL(MSH_ENOMEM, "out of memory");
    if (index_add(&g->kv_index, kv->name, i, kv_name_at, g) < 0)
      return MSH_FAIL(MSH_EFORMAT, "'%s': key '%s' appears twice", r->path, kv->name);
    snprintf(what, sizeof what, "the type of key %d", i);
    if ((s = read_u32(r, &type, what)) != MSH_OK) return s;
    if (type > MSH_GGUF_F64)
      return MSH_FAIL(MSH_EFORMAT, "'%s': key '%s' has unknown value type %u", r->path, kv->name, type);
    kv->type = (int)type;
    if ((s = read_value(r, kv, kv->name)) != MSH_OK) return s;
  }
  return MSH_OK;
}

static uint32_t load_u32(const uint8_t *b) {
  return (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
}

static msh_status read_alignment(msh_gguf *g, const char *path) {
  g->alignment = GGUF_DEFAULT_ALIGNMENT;
  int i = index_find(&g->kv_index, "general.alignment", kv_name_at, g);
  if (i < 0) return MSH_OK;
  if (g->kv[i].type != MSH_GGUF_U32)
    return MSH_FAIL(MSH_EFORMAT, "'%s': general.alignment is a %s, not a u32", path,
                    value_type_name(g->kv[i].type));
  uint32_t a = load_u32(g->base + g->kv[i].at);
  if (a == 0 || (a & (a - 1)))
    return MSH_FAIL(MSH_EFORMAT, "'%s': general.alignment %u is not a power of two", path, a);
  g->alignment = a;
  return MSH_OK;
}

/* ---------------------------------------------------------------------------- tensor infos */

static msh_status read_tensor_infos(msh_gguf *g, reader *r) {
  for (int i = 0; i < g->n_tensors; i++) {
    gguf_tensor *t = &g->tensors[i];
    char what[64];
    uint64_t len = 0, at = 0;
    snprintf(what, sizeof what, "the name of tensor %d", i);
    msh_status s = read_string(r, &len, &at, what);
    if (s != MSH_OK) return s;
    if (!(t->name = copy_name(r, at, len))) return MSH_FAIL(MSH_ENOMEM, "out of memory");
    if (index_add(&g->tensor_index, t->name, i, tensor_name_at, g) < 0)
      return MSH_FAIL(MSH_EFORMAT, "'%s': tensor '%s' appears twice", r->path, t->name);
    uint32_t nd = 0, type = 0;
    snprintf(what, sizeof what, "the dims of tensor %d", i);
    if ((s = read_u32(r, &nd, what)) != MSH_OK) return s;
    if (nd > GGUF_MAX_DIMS)
      return MSH_FAIL(MSH_EFORMAT, "'%s': tensor '%s' has %u dims; GGUF allows at most %d", r->path,
                      t->name, nd, GGUF_MAX_DIMS);
    t->ndim = (int)nd;
    uint64_t numel = 1, ne0 = 1;
    int zero = 0;
    for (uint32_t d = 0; d < nd; d++) {
      uint64_t v = 0;
      if ((s = read_u64(r, &v, what)) != MSH_OK) return s;
      if (v > (uint64_t)INT64_MAX)
        return MSH_FAIL(MSH_EFORMAT, "'%s': tensor '%s' dim %u is %llu", r->path, t->name, d,
                        (unsigned long long)v);
      if (v == 0) zero = 1;
      else if (numel > (uint64_t)INT64_MAX / v)
        return MSH_FAIL(MSH_EFORMAT, "'%s': tensor '%s' has more elements than fit in 63 bits", r->path,
                        t->name);
      else numel *= v;
      if (d == 0) ne0 = v;
      t->shape[nd - 1 - d] = (int64_t)v; /* innermost first in the file, last here */
    }
    if (zero) numel = 0;
    snprintf(what, sizeof what, "the type of tensor %d", i);
    if ((s = read_u32(r, &type, what)) != MSH_OK) return s;
    const ggml_type_info *ti = ggml_type((int)type);
    if (!ti)
      return MSH_FAIL(MSH_EUNSUPPORTED, "'%s': tensor '%s' has unknown ggml type %u", r->path, t->name, type);
    t->type = (int)type;
    if (ne0 % ti->block)
      return MSH_FAIL(MSH_EFORMAT, "'%s': tensor '%s' of type %s has rows of %llu elements, not a multiple of %u",
                      r->path, t->name, ti->name, (unsigned long long)ne0, ti->block);
    uint64_t blocks = numel / ti->block;
    if (blocks > UINT64_MAX / ti->bytes)
      return MSH_FAIL(MSH_EFORMAT, "'%s': tensor '%s' is too large", r->path, t->name);
    t->nbytes = blocks * ti->bytes;
    snprintf(what, sizeof what, "the offset of tensor %d", i);
    if ((s = read_u64(r, &t->offset, what)) != MSH_OK) return s;
    if (t->offset % g->alignment)
      return MSH_FAIL(MSH_EFORMAT, "'%s': tensor '%s' data offset %llu is not a multiple of the alignment %u",
                      r->path, t->name, (unsigned long long)t->offset, g->alignment);
  }
  return MSH_OK;
}

/* Turns relative tensor offsets into absolute ones and checks each lies in the data section. */
static msh_status place_tensors(msh_gguf *g, const reader *r) {
  if (g->n_tensors == 0) return MSH_OK;
  uint64_t a = g->alignment, data = r->pos + (a - r->pos % a) % a;
  if (data > g->size)
    return MSH_FAIL(MSH_EFORMAT, "'%s': the data section would start at offset %llu, past the end of the file (%llu bytes)",
                    r->path, (unsigned long long)data, (unsigned long long)g->size);
  uint64_t avail = g->size - data;
  for (int i = 0; i < g->n_tensors; i++) {
    gguf_tensor *t = &g->tensors[i];
    if (t->offset > avail || t->nbytes > avail - t->offset)
      return MSH_FAIL(MSH_EFORMAT, "'%s': tensor '%s' data (%llu bytes at data offset %llu) runs past the end of the file (data section of %llu bytes at offset %llu)",
                      r->path, t->name, (unsigned long long)t->nbytes, (unsigned long long)t->offset,
                      (unsigned long long)avail, (unsigned long long)data);
    t->offset += data;
  }
  return MSH_OK;
}

/* ------------------------------------------------------------------------------- open/free */

static msh_status read_header(msh_gguf *g, reader *r) {
  uint8_t magic[4];
  msh_status s = read_bytes(r, magic, 4, "the magic");
  if (s != MSH_OK) return s;
  if (memcmp(magic, "GGUF", 4) != 0)
    return MSH_FAIL(MSH_EFORMAT, "'%s' is not a GGUF file (magic %02x %02x %02x %02x, wanted \"GGUF\")",
                    r->path, magic[0], magic[1], magic[2], magic[3]);
  if ((s = read_u32(r, &g->version, "the version")) != MSH_OK) return s;
  if (g->version == 1)
    return MSH_FAIL(MSH_EUNSUPPORTED, "'%s': GGUF version 1 is not supported (only 2 and 3)", r->path);
  if (g->version > 0xffff && (g->version & 0xffff) == 0)
    return MSH_FAIL(MSH_EUNSUPPORTED, "'%s' is a big-endian GGUF file, which moonshard does not read", r->path);
  if (g->version != 2 && g->version != 3)
    return MSH_FAIL(MSH_EUNSUPPORTED, "'%s': GGUF version %u is not supported (only 2 and 3)", r->path,
                    g->version);
  uint64_t nt = 0, nkv = 0;
  if ((s = read_u64(r, &nt, "the tensor count")) != MSH_OK) return s;
  if ((s = read_u64(r, &nkv, "the metadata count")) != MSH_OK) return s;
  uint64_t room = remaining(r);
  if (nt > (uint64_t)INT32_MAX || nkv > (uint64_t)INT32_MAX || nt > room / MIN_TENSOR_BYTES ||
      nkv > room / MIN_KV_BYTES || nt * MIN_TENSOR_BYTES + nkv * MIN_KV_BYTES > room)
    return MSH_FAIL(MSH_EFORMAT, "'%s': %llu tensors and %llu metadata keys cannot fit in a file of %llu bytes",
                    r->path, (unsigned long long)nt, (unsigned long long)nkv, (unsigned long long)r->size);
  g->n_tensors = (int)nt;
  g->n_kv = (int)nkv;
  g->kv = calloc(nkv ? nkv : 1, sizeof *g->kv);
  g->tensors = calloc(nt ? nt : 1, sizeof *g->tensors);
  if (!g->kv || !g->tensors) return MSH_FAIL(MSH_ENOMEM, "out of memory");
  if ((s = index_init(&g->kv_index, g->n_kv)) != MSH_OK) return s;
  return index_init(&g->tensor_index, g->n_tensors);
}

msh_status msh_gguf_open(msh_gguf **out, const char *path) {
  if (!out || !path) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  msh_gguf *g = calloc(1, sizeof *g);
  if (!g) return MSH_FAIL(MSH_ENOMEM, "out of memory");
  msh_status s = msh_file_open(&g->file, path);
  if (s != MSH_OK) {
    free(g);
    return s;
  }
  g->base = msh_file_data(g->file);
  g->size = msh_file_size(g->file);
  reader r = {g->base, g->size, 0, path};
  if ((s = read_header(g, &r)) == MSH_OK && (s = read_kvs(g, &r)) == MSH_OK &&
      (s = read_alignment(g, path)) == MSH_OK && (s = read_tensor_infos(g, &r)) == MSH_OK)
    s = place_tensors(g, &r);
  if (s != MSH_OK) {
    msh_gguf_free(g);
    return s;
  }
  *out = g;
  return MSH_OK;
}

void msh_gguf_free(msh_gguf *g) {
  if (!g) return;
  for (int i = 0; g->kv && i < g->n_kv; i++) {
    free(g->kv[i].name);
    free(g->kv[i].str_at);
  }
  for (int i = 0; g->tensors && i < g->n_tensors; i++) free(g->tensors[i].name);
  free(g->kv);
  free(g->tensors);
  free(g->kv_index.slots);
  free(g->tensor_index.slots);
  msh_file_free(g->file);
  free(g);
}

uint32_t msh_gguf_version(const msh_gguf *g) { return g ? g->version : 0; }
uint32_t msh_gguf_alignment(const msh_gguf *g) { return g ? g->alignment : 0; }
msh_file *msh_gguf_file(const msh_gguf *g) { return g ? g->file : NULL; }

/* ------------------------------------------------------------------------------ metadata API */

int msh_gguf_key_count(const msh_gguf *g) { return g ? g->n_kv : 0; }

const char *msh_gguf_key_name(const msh_gguf *g, int i) {
  return (g && i >= 0 && i < g->n_kv) ? g->kv[i].name : NULL;
}

int msh_gguf_key_type(const msh_gguf *g, int i) {
  return (g && i >= 0 && i < g->n_kv) ? g->kv[i].type : -1;
}

msh_status msh_gguf_find_key(const msh_gguf *g, const char *name, int *index) {
  if (!g || !name || !index) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  int i = index_find(&g->kv_index, name, kv_name_at, g);
  if (i < 0) return MSH_FAIL(MSH_ENOENT, "'%s' has no key '%s'", msh_file_path(g->file), name);
  *index = i;
  return MSH_OK;
}

static msh_status key_at(const msh_gguf *g, int i, const gguf_kv **kv) {
  if (!g) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  if (i < 0 || i >= g->n_kv) return MSH_FAIL(MSH_ERANGE, "key index %d outside [0, %d)", i, g->n_kv);
  *kv = &g->kv[i];
  return MSH_OK;
}

/* Reads one scalar of a numeric type at p as int64 (is_int) or double. */
static msh_status scalar_int(int type, const uint8_t *p, int64_t *out, const char *key) {
  uint64_t u = 0;
  for (int b = value_type_sizes[type] - 1; b >= 0; b--) u = u << 8 | p[b];
  switch (type) {
  case MSH_GGUF_U8: case MSH_GGUF_U16: case MSH_GGUF_U32: case MSH_GGUF_BOOL:
    *out = (int64_t)u;
    return MSH_OK;
  case MSH_GGUF_I8: *out = (int8_t)u; return MSH_OK;
  case MSH_GGUF_I16: *out = (int16_t)u; return MSH_OK;
  case MSH_GGUF_I32: *out = (int32_t)u; return MSH_OK;
  case MSH_GGUF_I64: *out = (int64_t)u; return MSH_OK;
  case MSH_GGUF_U64:
    if (u > (uint64_t)INT64_MAX)
      return MSH_FAIL(MSH_ERANGE, "key '%s': u64 value %llu does not fit in an int64", key,
                      (unsigned long long)u);
    *out = (int64_t)u;
    return MSH_OK;
  default:
    return MSH_FAIL(MSH_EINVAL, "key '%s' holds %s values, not integers", key, value_type_name(type));
  }
}

static msh_status scalar_float(int type, const uint8_t *p, double *out, const char *key) {
  if (type == MSH_GGUF_F32) {
    float f;
    memcpy(&f, p, 4);
    *out = f;
    return MSH_OK;
  }
  if (type == MSH_GGUF_F64) {
    memcpy(out, p, 8);
    return MSH_OK;
  }
  if (type == MSH_GGUF_U64) {
    uint64_t u = load_u64(p);
    *out = (double)u;
    return MSH_OK;
  }
  int64_t v;
  if (type == MSH_GGUF_STRING || type == MSH_GGUF_ARRAY || scalar_int(type, p, &v, key) != MSH_OK)
    return MSH_FAIL(MSH_EINVAL, "key '%s' holds %s values, not numbers", key, value_type_name(type));
  *out = (double)v;
  return MSH_OK;
}

msh_status msh_gguf_get_int(const msh_gguf *g, int i, int64_t *out) {
  const gguf_kv *kv = NULL;
  msh_status s = key_at(g, i, &kv);
  if (s != MSH_OK) return s;
  if (!out) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  if (kv->type == MSH_GGUF_STRING || kv->type == MSH_GGUF_ARRAY)
    return MSH_FAIL(MSH_EINVAL, "key '%s' is a %s, not an integer", kv->name, value_type_name(kv->type));
  return scalar_int(kv->type, g->base + kv->at, out, kv->name);
}

msh_status msh_gguf_get_float(const msh_gguf *g, int i, double *out) {
  const gguf_kv *kv = NULL;
  msh_status s = key_at(g, i, &kv);
  if (s != MSH_OK) return s;
  if (!out) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  if (kv->type == MSH_GGUF_STRING || kv->type == MSH_GGUF_ARRAY || kv->type == MSH_GGUF_BOOL)
    return MSH_FAIL(MSH_EINVAL, "key '%s' is a %s, not a number", kv->name, value_type_name(kv->type));
  return scalar_float(kv->type, g->base + kv->at, out, kv->name);
}

msh_status msh_gguf_get_string(const msh_gguf *g, int i, const char **str, size_t *len) {
  const gguf_kv *kv = NULL;
  msh_status s = key_at(g, i, &kv);
  if (s != MSH_OK) return s;
  if (!str || !len) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  if (kv->type != MSH_GGUF_STRING)
    return MSH_FAIL(MSH_EINVAL, "key '%s' is a %s, not a string", kv->name, value_type_name(kv->type));
  *str = (const char *)g->base + kv->at;
  *len = (size_t)kv->n;
  return MSH_OK;
}

msh_status msh_gguf_get_array(const msh_gguf *g, int i, int *elem_type, uint64_t *n) {
  const gguf_kv *kv = NULL;
  msh_status s = key_at(g, i, &kv);
  if (s != MSH_OK) return s;
  if (kv->type != MSH_GGUF_ARRAY)
    return MSH_FAIL(MSH_EINVAL, "key '%s' is a %s, not an array", kv->name, value_type_name(kv->type));
  if (elem_type) *elem_type = kv->elem_type;
  if (n) *n = kv->n;
  return MSH_OK;
}

/* Key i as an array, and element j of it in range. */
static msh_status element_at(const msh_gguf *g, int i, uint64_t j, const gguf_kv **kv) {
  msh_status s = key_at(g, i, kv);
  if (s != MSH_OK) return s;
  if ((*kv)->type != MSH_GGUF_ARRAY)
    return MSH_FAIL(MSH_EINVAL, "key '%s' is a %s, not an array", (*kv)->name, value_type_name((*kv)->type));
  if (j >= (*kv)->n)
    return MSH_FAIL(MSH_ERANGE, "element %llu of key '%s' outside [0, %llu)", (unsigned long long)j,
                    (*kv)->name, (unsigned long long)(*kv)->n);
  return MSH_OK;
}

msh_status msh_gguf_array_int(const msh_gguf *g, int i, uint64_t j, int64_t *out) {
  const gguf_kv *kv = NULL;
  msh_status s = element_at(g, i, j, &kv);
  if (s != MSH_OK) return s;
  if (!out) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  if (kv->elem_type == MSH_GGUF_STRING)
    return MSH_FAIL(MSH_EINVAL, "key '%s' holds strings, not integers", kv->name);
  return scalar_int(kv->elem_type, g->base + kv->at + j * value_type_sizes[kv->elem_type], out, kv->name);
}

msh_status msh_gguf_array_float(const msh_gguf *g, int i, uint64_t j, double *out) {
  const gguf_kv *kv = NULL;
  msh_status s = element_at(g, i, j, &kv);
  if (s != MSH_OK) return s;
  if (!out) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  if (kv->elem_type == MSH_GGUF_STRING || kv->elem_type == MSH_GGUF_BOOL)
    return MSH_FAIL(MSH_EINVAL, "key '%s' holds %s values, not numbers", kv->name,
                    value_type_name(kv->elem_type));
  return scalar_float(kv->elem_type, g->base + kv->at + j * value_type_sizes[kv->elem_type], out, kv->name);
}

msh_status msh_gguf_array_string(const msh_gguf *g, int i, uint64_t j, const char **str, size_t *len) {
  const gguf_kv *kv = NULL;
  msh_status s = element_at(g, i, j, &kv);
  if (s != MSH_OK) return s;
  if (!str || !len) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  if (kv->elem_type != MSH_GGUF_STRING)
    return MSH_FAIL(MSH_EINVAL, "key '%s' holds %s values, not strings", kv->name,
                    value_type_name(kv->elem_type));
  uint64_t at = kv->str_at[j];
  *str = (const char *)g->base + at;
  *len = (size_t)load_u64(g->base + at - 8);
  return MSH_OK;
}

msh_status msh_gguf_array_data(const msh_gguf *g, int i, const void **data) {
  const gguf_kv *kv = NULL;
  msh_status s = key_at(g, i, &kv);
  if (s != MSH_OK) return s;
  if (!data) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  if (kv->type != MSH_GGUF_ARRAY || kv->elem_type == MSH_GGUF_STRING)
    return MSH_FAIL(MSH_EINVAL, "key '%s' is not an array of numbers", kv->name);
  *data = g->base + kv->at;
  return MSH_OK;
}

/* ------------------------------------------------------------------------------- tensor API */

int msh_gguf_tensor_count(const msh_gguf *g) { return g ? g->n_tensors : 0; }

const char *msh_gguf_tensor_name(const msh_gguf *g, int i) {
  return (g && i >= 0 && i < g->n_tensors) ? g->tensors[i].name : NULL;
}

msh_status msh_gguf_find_tensor(const msh_gguf *g, const char *name, int *index) {
  if (!g || !name || !index) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  int i = index_find(&g->tensor_index, name, tensor_name_at, g);
  if (i < 0) return MSH_FAIL(MSH_ENOENT, "'%s' has no tensor '%s'", msh_file_path(g->file), name);
  *index = i;
  return MSH_OK;
}

msh_status msh_gguf_tensor_info(const msh_gguf *g, int i, int *ggml_type_out, int *ndim,
                                int64_t *shape, uint64_t *offset, uint64_t *nbytes) {
  if (!g) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  if (i < 0 || i >= g->n_tensors)
    return MSH_FAIL(MSH_ERANGE, "tensor index %d outside [0, %d)", i, g->n_tensors);
  const gguf_tensor *t = &g->tensors[i];
  if (ggml_type_out) *ggml_type_out = t->type;
  if (ndim) *ndim = t->ndim;
  if (shape)
    for (int d = 0; d < GGUF_MAX_DIMS; d++) shape[d] = d < t->ndim ? t->shape[d] : 0;
  if (offset) *offset = t->offset;
  if (nbytes) *nbytes = t->nbytes;
  return MSH_OK;
}

/* ----------------------------------------------------------------------------- tensors */

msh_status msh_gguf_tensor(const msh_gguf *g, int i, msh_tensor **out) {
  if (!g || !out) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  if (i < 0 || i >= g->n_tensors)
    return MSH_FAIL(MSH_ERANGE, "tensor index %d outside [0, %d)", i, g->n_tensors);
  const gguf_tensor *t = &g->tensors[i];
  int dtype = -1;
  switch (t->type) {
  case MSH_GGML_F32: dtype = MSH_F32; break;
  case MSH_GGML_F16: dtype = MSH_F16; break;
  case MSH_GGML_BF16: dtype = MSH_BF16; break;
  case MSH_GGML_I8: dtype = MSH_I8; break;
  case MSH_GGML_I32: dtype = MSH_I32; break;
  case MSH_GGML_Q8_0: dtype = MSH_Q8_0; break;
  case MSH_GGML_Q4_0: dtype = MSH_Q4_0; break;
  case MSH_GGML_Q4_1: dtype = MSH_Q4_1; break;
  default:
    return MSH_FAIL(MSH_EUNSUPPORTED, "'%s': tensor '%s' has type %s, which moonshard does not load",
                    msh_file_path(g->file), t->name, msh_gguf_ggml_type_name(t->type));
  }
  /* the same layouts as ggml's: the block dtypes view the file's bytes as they are */
  return msh_tensor_from_file(out, g->file, t->offset, dtype, t->ndim, t->shape);
}
