/* safetensors.c: the safetensors container, mmap'd, header parsed and checked, zero-copy views.
 *
 * Layout: u64 little-endian N, then N bytes of JSON header, then the data section. The header maps
 * tensor names to {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]} (offsets relative
 * to the data section) plus an optional "__metadata__" string map. Every entry is checked at open,
 * so a view handed out later never reads outside the file.
 */
#include "internal.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The header of a real checkpoint is a few hundred KiB; the reference implementation refuses
 * headers over 100 MB. */
#define ST_MAX_HEADER ((uint64_t)100 * 1000 * 1000)
/* Integers in JSON are doubles to cJSON: exact up to 2^53. */
#define ST_MAX_INT 9007199254740992.0

/* ------------------------------------------------------------------------------ dtypes */

typedef struct {
  const char *name; /* as spelled in the header */
  int bits;         /* per element */
  int dtype;        /* msh_dtype, or -1 when moonshard does not load it */
} st_dtype;

static const st_dtype st_dtypes[] = {
    {"F32", 32, MSH_F32},      {"F16", 16, MSH_F16},      {"BF16", 16, MSH_BF16},
    {"I32", 32, MSH_I32},      {"I8", 8, MSH_I8},         {"F64", 64, -1},
    {"I64", 64, -1},           {"I16", 16, -1},           {"U8", 8, -1},
    {"U16", 16, -1},           {"U32", 32, -1},           {"U64", 64, -1},
    {"BOOL", 8, -1},           {"F8_E4M3", 8, -1},        {"F8_E5M2", 8, -1},
    {"F8_E8M0", 8, -1},        {"F6_E2M3", 6, -1},        {"F6_E3M2", 6, -1},
    {"F4", 4, -1},             {"C64", 64, -1},
};

static const st_dtype *st_dtype_find(const char *name) {
  for (size_t i = 0; i < sizeof st_dtypes / sizeof st_dtypes[0]; i++)
    if (strcmp(st_dtypes[i].name, name) == 0) return &st_dtypes[i];
  return NULL;
}

/* ------------------------------------------------------------------------------ object */

typedef struct {
  char *name;
  const st_dtype *dt;
  int ndim;
  int64_t shape[MSH_MAX_DIMS];
  uint64_t begin, end; /* relative to the data section */
} st_entry;

struct msh_safetensors {
  msh_file *file;
  uint64_t data_start; /* 8 + N */
  int n;
  st_entry *e;   /* (n) in file order */
  int *by_name;  /* (n) entry indices sorted by name, for msh_safetensors_find */
};

void msh_safetensors_free(msh_safetensors *st) {
  if (!st) return;
  for (int i = 0; i < st->n; i++) free(st->e[i].name);
  free(st->e);
  free(st->by_name);
  msh_file_free(st->file);
  free(st);
}

/* ------------------------------------------------------------------------------ checks */

/* A JSON number that is a non-negative integer representable exactly. */
static int json_uint(const cJSON *j, uint64_t *out) {
  if (!cJSON_IsNumber(j)) return 0;
  double d = j->valuedouble;
  if (!(d >= 0.0) || d > ST_MAX_INT || d != (double)(uint64_t)d) return 0;
  *out = (uint64_t)d;
  return 1;
}

/* Parses and checks one header entry into *e (name not set). path and name are for messages. */
static msh_status parse_entry(const cJSON *j, const char *path, const char *name, uint64_t data_size,
                              st_entry *e) {
  if (!cJSON_IsObject(j))
    return MSH_FAIL(MSH_EFORMAT, "'%s': tensor '%s': entry is not a JSON object", path, name);

  const cJSON *jd = cJSON_GetObjectItemCaseSensitive(j, "dtype");
  if (!cJSON_IsString(jd) || !jd->valuestring)
    return MSH_FAIL(MSH_EFORMAT, "'%s': tensor '%s': missing or non-string \"dtype\"", path, name);
  e->dt = st_dtype_find(jd->valuestring);
  if (!e->dt)
    return MSH_FAIL(MSH_EFORMAT, "'%s': tensor '%s': unknown dtype \"%.32s\"", path, name,
                    jd->valuestring);

  const cJSON *js = cJSON_GetObjectItemCaseSensitive(j, "shape");
  if (!cJSON_IsArray(js))
    return MSH_FAIL(MSH_EFORMAT, "'%s': tensor '%s': missing or non-array \"shape\"", path, name);
  int ndim = cJSON_GetArraySize(js);
  if (ndim > MSH_MAX_DIMS)
    return MSH_FAIL(MSH_EUNSUPPORTED, "'%s': tensor '%s': %d dims (moonshard handles at most %d)",
                    path, name, ndim, MSH_MAX_DIMS);
  e->ndim = ndim;
  /* numel * bits, checked: shapes are bounded by the data section, so any overflow is a lie */
  uint64_t bits = (uint64_t)e->dt->bits;
  int k = 0, overflow = 0;
  for (const cJSON *d = js->child; d; d = d->next, k++) {
    uint64_t v;
    if (!json_uint(d, &v))
      return MSH_FAIL(MSH_EFORMAT, "'%s': tensor '%s': shape[%d] is not a non-negative integer",
                      path, name, k);
    e->shape[k] = (int64_t)v;
    if (!overflow && __builtin_mul_overflow(bits, v, &bits)) overflow = 1;
  }

  const cJSON *jo = cJSON_GetObjectItemCaseSensitive(j, "data_offsets");
  if (!cJSON_IsArray(jo) || cJSON_GetArraySize(jo) != 2)
    return MSH_FAIL(MSH_EFORMAT, "'%s': tensor '%s': missing \"data_offsets\" [begin, end]", path,
                    name);
  if (!json_uint(jo->child, &e->begin) || !json_uint(jo->child->next, &e->end))
    return MSH_FAIL(MSH_EFORMAT, "'%s': tensor '%s': data_offsets are not non-negative integers",
                    path, name);
  if (e->begin > e->end)
    return MSH_FAIL(MSH_EFORMAT, "'%s': tensor '%s': data_offsets [%llu, %llu] end before they begin",
                    path, name, (unsigned long long)e->begin, (unsigned long long)e->end);
  if (e->end > data_size)
    return MSH_FAIL(MSH_EFORMAT,
                    "'%s': tensor '%s': data_offsets [%llu, %llu] exceed the data section (%llu bytes)",
                    path, name, (unsigned long long)e->begin, (unsigned long long)e->end,
                    (unsigned long long)data_size);
  uint64_t len = e->end - e->begin;
  if (overflow)
    return MSH_FAIL(MSH_EFORMAT, "'%s': tensor '%s': shape has more elements than any file holds",
                    path, name);
  if (bits % 8 != 0)
    return MSH_FAIL(MSH_EFORMAT, "'%s': tensor '%s': %s x shape is not a whole number of bytes",
                    path, name, e->dt->name);
  if (bits / 8 != len)
    return MSH_FAIL(MSH_EFORMAT,
                    "'%s': tensor '%s': data_offsets [%llu, %llu] hold %llu bytes but %s x shape needs %llu",
                    path, name, (unsigned long long)e->begin, (unsigned long long)e->end,
                    (unsigned long long)len, e->dt->name, (unsigned long long)(bits / 8));
  return MSH_OK;
}

/* __metadata__ is a map of strings to strings; moonshard keeps none of it. */
static msh_status check_metadata(const cJSON *j, const char *path) {
  if (!cJSON_IsObject(j))
    return MSH_FAIL(MSH_EFORMAT, "'%s': \"__metadata__\" is not a JSON object", path);
  for (const cJSON *m = j->child; m; m = m->next)
    if (!cJSON_IsString(m))
      return MSH_FAIL(MSH_EFORMAT, "'%s': \"__metadata__\" entry '%s' is not a string", path,
                      m->string ? m->string : "?");
  return MSH_OK;
}

/* qsort comparators need context; a file-scope pointer is not thread-safe, so sort pairs. */
typedef struct {
  uint64_t begin, end;
  int index;
} st_span;

static int span_cmp(const void *a, const void *b) {
  const st_span *x = a, *y = b;
  if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
  if (x->end != y->end) return x->end < y->end ? -1 : 1;
  return x->index - y->index;
}

typedef struct {
  const char *name;
  int index;
} st_named;

static int named_cmp(const void *a, const void *b) {
  const st_named *x = a, *y = b;
  int c = strcmp(x->name, y->name);
  return c ? c : x->index - y->index;
}

/* Entries must not share bytes (empty ones occupy none), and names must be unique. */
static msh_status check_layout(msh_safetensors *st, const char *path) {
  int n = st->n;
  if (n == 0) return MSH_OK;
  st_span *sp = malloc((size_t)n * sizeof *sp);
  st_named *nm = malloc((size_t)n * sizeof *nm);
  st->by_name = malloc((size_t)n * sizeof *st->by_name);
  msh_status s = MSH_OK;
  if (!sp || !nm || !st->by_name) {
    s = MSH_FAIL(MSH_ENOMEM, "out of memory");
    goto done;
  }
  int m = 0;
  for (int i = 0; i < n; i++) {
    if (st->e[i].begin < st->e[i].end) sp[m++] = (st_span){st->e[i].begin, st->e[i].end, i};
    nm[i] = (st_named){st->e[i].name, i};
  }
  qsort(sp, (size_t)m, sizeof *sp, span_cmp);
  for (int i = 1; i < m; i++) {
    if (sp[i].begin < sp[i - 1].end) {
      const st_entry *a = &st->e[sp[i - 1].index], *b = &st->e[sp[i].index];
      s = MSH_FAIL(MSH_EFORMAT,
                   "'%s': tensor '%s': data_offsets [%llu, %llu] overlap tensor '%s' [%llu, %llu]",
                   path, b->name, (unsigned long long)b->begin, (unsigned long long)b->end, a->name,
                   (unsigned long long)a->begin, (unsigned long long)a->end);
      goto done;
    }
  }
  qsort(nm, (size_t)n, sizeof *nm, named_cmp);
  for (int i = 0; i < n; i++) {
    if (i > 0 && strcmp(nm[i].name, nm[i - 1].name) == 0) {
      s = MSH_FAIL(MSH_EFORMAT, "'%s': tensor '%s' appears twice in the header", path, nm[i].name);
      goto done;
    }
    st->by_name[i] = nm[i].index;
  }
done:
  free(sp);
  free(nm);
  return s;
}

/* -------------------------------------------------------------------------------- open */

static msh_status parse_header(msh_safetensors *st, const char *path) {
  const unsigned char *base = msh_file_data(st->file);
  uint64_t size = msh_file_size(st->file);
  if (size < 8)
    return MSH_FAIL(MSH_EFORMAT, "'%s': %llu bytes is too short for a safetensors file", path,
                    (unsigned long long)size);
  uint64_t hlen = 0;
  for (int i = 7; i >= 0; i--) hlen = hlen << 8 | base[i];
  if (hlen > size - 8)
    return MSH_FAIL(MSH_EFORMAT, "'%s': header length %llu runs past the end of the file (%llu bytes)",
                    path, (unsigned long long)hlen, (unsigned long long)size);
  if (hlen < 2 || hlen > ST_MAX_HEADER)
    return MSH_FAIL(MSH_EFORMAT, "'%s': header length %llu is not plausible", path,
                    (unsigned long long)hlen);
  st->data_start = 8 + hlen;
  uint64_t data_size = size - st->data_start;

  /* parse a NUL-terminated copy: the mapping need not end where the header does */
  char *text = malloc((size_t)hlen + 1);
  if (!text) return MSH_FAIL(MSH_ENOMEM, "out of memory (%llu-byte header)", (unsigned long long)hlen);
  memcpy(text, base + 8, (size_t)hlen);
  text[hlen] = '\0';
  const char *end = NULL;
  cJSON *root = cJSON_ParseWithOpts(text, &end, 0);
  msh_status s = MSH_OK;
  if (!root) {
    s = MSH_FAIL(MSH_EFORMAT, "'%s': the header is not valid JSON (at byte %llu of %llu)", path,
                 (unsigned long long)(end && end >= text ? end - text : 0), (unsigned long long)hlen);
    goto done;
  }
  /* the reference writer pads the header with spaces; anything else after the object is a lie */
  for (const char *c = end; c < text + hlen; c++) {
    if (*c != ' ' && *c != '\t' && *c != '\n' && *c != '\r') {
      s = MSH_FAIL(MSH_EFORMAT, "'%s': unexpected bytes after the JSON header (at byte %llu)", path,
                   (unsigned long long)(c - text));
      goto done;
    }
  }
  if (!cJSON_IsObject(root)) {
    s = MSH_FAIL(MSH_EFORMAT, "'%s': the header is not a JSON object", path);
    goto done;
  }
  int n = 0;
  for (const cJSON *j = root->child; j; j = j->next) n++;
  st->e = calloc(n ? (size_t)n : 1, sizeof *st->e);
  if (!st->e) {
    s = MSH_FAIL(MSH_ENOMEM, "out of memory");
    goto done;
  }
  for (const cJSON *j = root->child; j; j = j->next) {
    const char *name = j->string ? j->string : "";
    if (strcmp(name, "__metadata__") == 0) {
      s = check_metadata(j, path);
      if (s != MSH_OK) goto done;
      continue;
    }
    st_entry *e = &st->e[st->n];
    s = parse_entry(j, path, name, data_size, e);
    if (s != MSH_OK) goto done;
    e->name = strdup(name);
    if (!e->name) {
      s = MSH_FAIL(MSH_ENOMEM, "out of memory");
      goto done;
    }
    st->n++;
  }
  s = check_layout(st, path);
done:
  cJSON_Delete(root);
  free(text);
  return s;
}

msh_status msh_safetensors_open(msh_safetensors **out, const char *path) {
  if (!out || !path) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  msh_safetensors *st = calloc(1, sizeof *st);
  if (!st) return MSH_FAIL(MSH_ENOMEM, "out of memory");
  msh_status s = msh_file_open(&st->file, path);
  if (s == MSH_OK) s = parse_header(st, path);
  if (s != MSH_OK) {
    msh_safetensors_free(st);
    return s;
  }
  *out = st;
  return MSH_OK;
}

/* ----------------------------------------------------------------------------- queries */

int msh_safetensors_count(const msh_safetensors *st) { return st ? st->n : 0; }

const char *msh_safetensors_name(const msh_safetensors *st, int i) {
  return (st && i >= 0 && i < st->n) ? st->e[i].name : NULL;
}

msh_status msh_safetensors_find(const msh_safetensors *st, const char *name, int *index) {
  if (!st || !name || !index) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  int lo = 0, hi = st->n - 1;
  while (lo <= hi) {
    int mid = lo + (hi - lo) / 2;
    int k = st->by_name[mid];
    int c = strcmp(name, st->e[k].name);
    if (c == 0) {
      *index = k;
      return MSH_OK;
    }
    if (c < 0) hi = mid - 1;
    else lo = mid + 1;
  }
  return MSH_FAIL(MSH_ENOENT, "'%s': no tensor named '%s'", msh_file_path(st->file), name);
}

msh_status msh_safetensors_info(const msh_safetensors *st, int i, int *dtype, int *ndim,
                                int64_t *shape) {
  if (!st) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  if (i < 0 || i >= st->n)
    return MSH_FAIL(MSH_ERANGE, "entry %d outside [0, %d) of '%s'", i, st->n, msh_file_path(st->file));
  const st_entry *e = &st->e[i];
  if (dtype) *dtype = e->dt->dtype;
  if (ndim) *ndim = e->ndim;
  if (shape)
    for (int k = 0; k < MSH_MAX_DIMS; k++) shape[k] = k < e->ndim ? e->shape[k] : 0;
  return MSH_OK;
}

msh_status msh_safetensors_tensor(const msh_safetensors *st, int i, msh_tensor **out) {
  if (!st || !out) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  if (i < 0 || i >= st->n)
    return MSH_FAIL(MSH_ERANGE, "entry %d outside [0, %d) of '%s'", i, st->n, msh_file_path(st->file));
  const st_entry *e = &st->e[i];
  if (e->dt->dtype < 0)
    return MSH_FAIL(MSH_EUNSUPPORTED, "'%s': tensor '%s' has dtype %s, which moonshard does not load",
                    msh_file_path(st->file), e->name, e->dt->name);
  return msh_tensor_from_file(out, st->file, st->data_start + e->begin, e->dt->dtype, e->ndim,
                              e->shape);
}
