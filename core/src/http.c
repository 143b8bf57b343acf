/* http.c: HTTP/1.x messages parsed by Node's http_parser (2.9, Debian libhttp-parser-dev) into
 * buffers the caller reads: the request line or status, headers, body, keep-alive.
 *
 * The parser's callbacks only copy bytes here (no callback reaches Lua). A message stops the
 * parse when it completes (http_parser_pause), so pipelined requests are handed over one at a
 * time: the caller handles the message, calls msh_http_next and feeds the bytes not yet used.
 * Limits (head bytes, body bytes, header count) fail the parse with the HTTP status a server
 * answers (431, 413) instead of growing the buffers.
 */
#include "internal.h"

#include <http_parser.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
  size_t name_off, name_len, value_off, value_len; /* into head */
} http_header;

enum { LAST_NONE = 0, LAST_FIELD = 1, LAST_VALUE = 2 };

/* why a callback stopped the parse (the parser then reports HPE_CB_*) */
enum { LIMIT_NONE = 0, LIMIT_HEAD, LIMIT_BODY, LIMIT_COUNT, LIMIT_NOMEM };

struct msh_http {
  http_parser parser;
  http_parser_settings settings;
  int kind;                  /* MSH_HTTP_REQUEST or MSH_HTTP_RESPONSE */
  int64_t max_head;          /* bytes of url + header names and values */
  int64_t max_body;          /* bytes of body held at once */
  int max_headers;           /* header lines */
  char *head;                /* (head_cap) url, then header names and values, back to back */
  size_t head_len, head_cap;
  size_t url_off, url_len;
  http_header *headers;      /* (headers_cap) */
  int n_headers, headers_cap;
  int last;                  /* LAST_*: the callback seen last among field/value */
  char *body;                /* (body_cap) body bytes not consumed yet */
  size_t body_len, body_cap;
  int headers_done, complete, keep_alive, status_code;
  int limit;                 /* LIMIT_*: the reason a callback failed */
  int failed;                /* a failed feed; cleared by msh_http_reset */
  int error_status;          /* the HTTP status to answer a failed request with */
  const char *error_name;    /* http_errno name or our own */
};

static int grow(char **buf, size_t *cap, size_t need) {
  if (need <= *cap) return 0;
  size_t c = *cap ? *cap : 256;
  while (c < need) c *= 2;
  char *p = realloc(*buf, c);
  if (!p) return -1;
  *buf = p;
  *cap = c;
  return 0;
}

static msh_http *of(http_parser *p) { return (msh_http *)p->data; }

/* appends to head within max_head; 0 ok, -1 a limit (recorded) */
static int head_append(msh_http *h, const char *at, size_t len) {
  if ((int64_t)(h->head_len + len) > h->max_head) {
    h->limit = LIMIT_HEAD;
    return -1;
  }
  if (grow(&h->head, &h->head_cap, h->head_len + len) != 0) {
    h->limit = LIMIT_NOMEM;
    return -1;
  }
  memcpy(h->head + h->head_len, at, len);
  h->head_len += len;
  return 0;
}

static int on_message_begin(http_parser *p) {
  msh_http *h = of(p);
  h->head_len = h->url_off = h->url_len = 0;
  h->n_headers = 0;
  h->last = LAST_NONE;
  h->body_len = 0;
  h->headers_done = h->complete = 0;
  return 0;
}

static int on_url(http_parser *p, const char *at, size_t len) {
  msh_http *h = of(p);
  if (h->url_len == 0) h->url_off = h->head_len;
  if (head_append(h, at, len) != 0) return -1;
  h->url_len += len;
  return 0;
}

static int on_header_field(http_parser *p, const char *at, size_t len) {
  msh_http *h = of(p);
  if (h->last != LAST_FIELD) { /* a new header line */
    if (h->n_headers >= h->max_headers) {
      h->limit = LIMIT_COUNT;
      return -1;
    }
    if (h->n_headers == h->headers_cap) {
      int c = h->headers_cap ? h->headers_cap * 2 : 16;
      http_header *n = realloc(h->headers, (size_t)c * sizeof *n);
      if (!n) {
        h->limit = LIMIT_NOMEM;
        return -1;
      }
      h->headers = n;
      h->headers_cap = c;
    }
    http_header *hd = &h->headers[h->n_headers++];
    hd->name_off = h->head_len;
    hd->name_len = hd->value_off = hd->value_len = 0;
    h->last = LAST_FIELD;
  }
  if (head_append(h, at, len) != 0) return -1;
  h->headers[h->n_headers - 1].name_len += len;
  return 0;
}

static int on_header_value(http_parser *p, const char *at, size_t len) {
  msh_http *h = of(p);
  if (h->n_headers == 0) return 0; /* the parser never gives a value before a field */
  http_header *hd = &h->headers[h->n_headers - 1];
  if (h->last != LAST_VALUE) {
    hd->value_off = h->head_len;
    h->last = LAST_VALUE;
  }
  if (head_append(h, at, len) != 0) return -1;
  hd->value_len += len;
  return 0;
}

static int on_headers_complete(http_parser *p) {
  msh_http *h = of(p);
  /* a declared length over the limit fails now, before the body is sent (413 at once) */
  if ((p->flags & F_CONTENTLENGTH) && p->content_length != ULLONG_MAX &&
      p->content_length > (uint64_t)h->max_body) {
    h->limit = LIMIT_BODY;
    return -1; /* 1 and 2 mean "no body" to http_parser; any other value is an error */
  }
  h->headers_done = 1;
  h->keep_alive = http_should_keep_alive(p);
  h->status_code = h->kind == MSH_HTTP_RESPONSE ? (int)p->status_code : 0;
  return 0;
}

static int on_body(http_parser *p, const char *at, size_t len) {
  msh_http *h = of(p);
  if ((int64_t)(h->body_len + len) > h->max_body) {
    h->limit = LIMIT_BODY;
    return -1;
  }
  if (grow(&h->body, &h->body_cap, h->body_len + len) != 0) {
    h->limit = LIMIT_NOMEM;
    return -1;
  }
  memcpy(h->body + h->body_len, at, len);
  h->body_len += len;
  return 0;
}

static int on_message_complete(http_parser *p) {
  msh_http *h = of(p);
  h->complete = 1;
  h->keep_alive = http_should_keep_alive(p);
  http_parser_pause(p, 1); /* hand this message over before parsing the next */
  return 0;
}

static void init_parser(msh_http *h) {
  http_parser_init(&h->parser, h->kind == MSH_HTTP_RESPONSE ? HTTP_RESPONSE : HTTP_REQUEST);
  h->parser.data = h;
}

msh_status msh_http_new(msh_http **out, int kind, int64_t max_head, int64_t max_body, int max_headers) {
  if (!out) return MSH_FAIL(MSH_EINVAL, "out is NULL");
  if (kind != MSH_HTTP_REQUEST && kind != MSH_HTTP_RESPONSE)
    return MSH_FAIL(MSH_EINVAL, "kind %d is neither MSH_HTTP_REQUEST (0) nor MSH_HTTP_RESPONSE (1)", kind);
  if (max_head <= 0 || max_body < 0 || max_headers <= 0)
    return MSH_FAIL(MSH_EINVAL, "limits must be positive (head %lld, body %lld, headers %d)", (long long)max_head,
                    (long long)max_body, max_headers);
  msh_http *h = calloc(1, sizeof *h);
  if (!h) return MSH_FAIL(MSH_ENOMEM, "cannot allocate a parser");
  h->kind = kind;
  h->max_head = max_head;
  h->max_body = max_body;
  h->max_headers = max_headers;
  http_parser_settings_init(&h->settings);
  h->settings.on_message_begin = on_message_begin;
  h->settings.on_url = on_url;
  h->settings.on_header_field = on_header_field;
  h->settings.on_header_value = on_header_value;
  h->settings.on_headers_complete = on_headers_complete;
  h->settings.on_body = on_body;
  h->settings.on_message_complete = on_message_complete;
  init_parser(h);
  *out = h;
  return MSH_OK;
}

void msh_http_free(msh_http *h) {
  if (!h) return;
  free(h->head);
  free(h->headers);
  free(h->body);
  free(h);
}

static msh_status failure(msh_http *h) {
  enum http_errno e = HTTP_PARSER_ERRNO(&h->parser);
  h->failed = 1;
  switch (h->limit) {
  case LIMIT_HEAD:
    h->error_status = 431;
    h->error_name = "HPE_HEADER_OVERFLOW";
    return MSH_FAIL(MSH_ERANGE, "the request line and headers exceed %lld bytes", (long long)h->max_head);
  case LIMIT_COUNT:
    h->error_status = 431;
    h->error_name = "MSH_TOO_MANY_HEADERS";
    return MSH_FAIL(MSH_ERANGE, "more than %d header lines", h->max_headers);
  case LIMIT_BODY:
    h->error_status = 413;
    h->error_name = "MSH_BODY_TOO_LARGE";
    return MSH_FAIL(MSH_ERANGE, "the body exceeds %lld bytes", (long long)h->max_body);
  case LIMIT_NOMEM:
    h->error_status = 500;
    h->error_name = "MSH_NOMEM";
    return MSH_FAIL(MSH_ENOMEM, "cannot grow the message buffers");
  default: break;
  }
  h->error_status = e == HPE_HEADER_OVERFLOW ? 431 : 400;
  h->error_name = http_errno_name(e);
  return MSH_FAIL(MSH_EFORMAT, "%s: %s", http_errno_name(e), http_errno_description(e));
}

msh_status msh_http_feed(msh_http *h, const char *data, size_t n, size_t *used, int *state) {
  if (!h || !used || !state || (n > 0 && !data)) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  *used = 0;
  if (h->failed) return MSH_FAIL(MSH_EINVAL, "the parser failed before (%s); reset it first", h->error_name);
  if (h->complete) {
    *state = 2; /* the caller has not taken the message yet */
    return MSH_OK;
  }
  size_t got = http_parser_execute(&h->parser, &h->settings, data, n);
  if (got > n) got = n; /* http_parser answers 1 for a refused end of input (n == 0) */
  enum http_errno e = HTTP_PARSER_ERRNO(&h->parser);
  if (e != HPE_OK && !(e == HPE_PAUSED && h->complete)) {
    *used = got;
    return failure(h);
  }
  *used = got;
  *state = h->complete ? 2 : h->headers_done ? 1 : 0;
  return MSH_OK;
}

msh_status msh_http_next(msh_http *h) {
  if (!h) return MSH_FAIL(MSH_EINVAL, "NULL parser");
  if (h->failed) return MSH_FAIL(MSH_EINVAL, "the parser failed (%s); reset it instead", h->error_name);
  if (!h->complete) return MSH_FAIL(MSH_EINVAL, "no complete message to move past");
  on_message_begin(&h->parser);
  http_parser_pause(&h->parser, 0);
  return MSH_OK;
}

void msh_http_reset(msh_http *h) {
  if (!h) return;
  on_message_begin(&h->parser);
  h->limit = LIMIT_NONE;
  h->failed = 0;
  h->error_status = 0;
  h->error_name = NULL;
  h->keep_alive = h->status_code = 0;
  init_parser(h);
}

const char *msh_http_method(const msh_http *h) {
  if (!h || h->kind != MSH_HTTP_REQUEST || !h->headers_done) return "";
  return http_method_str((enum http_method)h->parser.method);
}

int msh_http_status_code(const msh_http *h) { return h ? h->status_code : 0; }

int msh_http_keep_alive(const msh_http *h) { return h ? h->keep_alive : 0; }

int msh_http_version(const msh_http *h) {
  return h && h->headers_done ? h->parser.http_major * 10 + h->parser.http_minor : 0;
}

int msh_http_error_status(const msh_http *h) { return h && h->failed ? h->error_status : 0; }

const char *msh_http_error_name(const msh_http *h) { return h && h->failed ? h->error_name : ""; }

const char *msh_http_url(const msh_http *h, size_t *n) {
  if (n) *n = h ? h->url_len : 0;
  return h && h->url_len ? h->head + h->url_off : "";
}

int msh_http_header_count(const msh_http *h) { return h ? h->n_headers : 0; }

msh_status msh_http_header(const msh_http *h, int i, const char **name, size_t *name_len, const char **value,
                           size_t *value_len) {
  if (!h || !name || !name_len || !value || !value_len) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  if (i < 0 || i >= h->n_headers) return MSH_FAIL(MSH_ERANGE, "header %d of %d", i, h->n_headers);
  const http_header *hd = &h->headers[i];
  *name = h->head + hd->name_off;
  *name_len = hd->name_len;
  *value = hd->value_len ? h->head + hd->value_off : "";
  *value_len = hd->value_len;
  return MSH_OK;
}

const char *msh_http_body(const msh_http *h, size_t *n) {
  if (n) *n = h ? h->body_len : 0;
  return h && h->body_len ? h->body : "";
}

msh_status msh_http_body_consume(msh_http *h, size_t n) {
  if (!h) return MSH_FAIL(MSH_EINVAL, "NULL parser");
  if (n > h->body_len) return MSH_FAIL(MSH_ERANGE, "consume %zu bytes of a body holding %zu", n, h->body_len);
  memmove(h->body, h->body + n, h->body_len - n);
  h->body_len -= n;
  return MSH_OK;
}
