/* test_http.c: msh_http (core/src/http.c): requests and responses fed whole and a byte at a
 * time, pipelined requests handed over one by one, chunked bodies, the limits (413, 431) and
 * malformed input named by http_parser's errno. */
#include "check.h"

#include <string.h>

static msh_http *parser(int kind, int64_t head, int64_t body, int headers) {
  msh_http *h = NULL;
  CHECK_OK(msh_http_new(&h, kind, head, body, headers));
  return h;
}

/* feeds all of s (in pieces of step bytes); returns the final state, or -1 on a failure */
static int feed_all(msh_http *h, const char *s, size_t n, size_t step, size_t *used_total) {
  size_t off = 0;
  int state = 0;
  while (off < n) {
    size_t k = n - off < step ? n - off : step, used = 0;
    if (msh_http_feed(h, s + off, k, &used, &state) != MSH_OK) return -1;
    off += used;
    if (state == 2) break;
    if (used != k) return -1; /* a parser that stops short without a message is a bug */
  }
  if (used_total) *used_total = off;
  return state;
}

static int header_is(msh_http *h, int i, const char *name, const char *value) {
  const char *np, *vp;
  size_t nl, vl;
  if (msh_http_header(h, i, &np, &nl, &vp, &vl) != MSH_OK) return 0;
  return nl == strlen(name) && memcmp(np, name, nl) == 0 && vl == strlen(value) && memcmp(vp, value, vl) == 0;
}

static int body_is(msh_http *h, const char *want) {
  size_t n;
  const char *b = msh_http_body(h, &n);
  return n == strlen(want) && memcmp(b, want, n) == 0;
}

static int url_is(msh_http *h, const char *want) {
  size_t n;
  const char *u = msh_http_url(h, &n);
  return n == strlen(want) && memcmp(u, want, n) == 0;
}

static void test_request(size_t step) {
  const char *req = "POST /v1/completions?x=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    "Content-Length: 13\r\n\r\n{\"prompt\":\"\"}";
  msh_http *h = parser(MSH_HTTP_REQUEST, 8192, 1 << 20, 64);
  size_t used = 0;
  CHECK(feed_all(h, req, strlen(req), step, &used) == 2);
  CHECK(used == strlen(req));
  CHECK(strcmp(msh_http_method(h), "POST") == 0);
  CHECK(url_is(h, "/v1/completions?x=1"));
  CHECK(msh_http_header_count(h) == 3);
  CHECK(header_is(h, 0, "Host", "127.0.0.1"));
  CHECK(header_is(h, 2, "Content-Length", "13"));
  CHECK(body_is(h, "{\"prompt\":\"\"}"));
  CHECK(msh_http_keep_alive(h) == 1);
  CHECK(msh_http_version(h) == 11);
  const char *np, *vp;
  size_t nl, vl;
  CHECK_STATUS(msh_http_header(h, 3, &np, &nl, &vp, &vl), MSH_ERANGE);
  msh_http_free(h);
}

static void test_pipelined(void) {
  const char *two = "GET /health HTTP/1.1\r\n\r\nGET /v1/models HTTP/1.1\r\nConnection: close\r\n\r\n";
  msh_http *h = parser(MSH_HTTP_REQUEST, 8192, 1024, 64);
  size_t used = 0;
  int state = -1;
  CHECK_OK(msh_http_feed(h, two, strlen(two), &used, &state));
  CHECK(state == 2);
  CHECK(used == strlen("GET /health HTTP/1.1\r\n\r\n"));
  CHECK(url_is(h, "/health"));
  CHECK(msh_http_keep_alive(h) == 1);
  /* feeding before next keeps handing over the same message */
  size_t used2 = 7;
  CHECK_OK(msh_http_feed(h, two + used, strlen(two) - used, &used2, &state));
  CHECK(state == 2 && used2 == 0);
  CHECK_OK(msh_http_next(h));
  CHECK_OK(msh_http_feed(h, two + used, strlen(two) - used, &used2, &state));
  CHECK(state == 2 && used + used2 == strlen(two));
  CHECK(url_is(h, "/v1/models"));
  CHECK(msh_http_header_count(h) == 1);
  CHECK(msh_http_keep_alive(h) == 0);
  msh_http_reset(h);
  CHECK_STATUS(msh_http_next(h), MSH_EINVAL); /* nothing complete after a reset */
  msh_http_free(h);
}

static void test_chunked_response(size_t step) {
  const char *res = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                    "6\r\ndata: \r\n3\r\nab\n\r\n0\r\n\r\n";
  msh_http *h = parser(MSH_HTTP_RESPONSE, 8192, 1024, 64);
  CHECK(feed_all(h, res, strlen(res), step, NULL) == 2);
  CHECK(msh_http_status_code(h) == 200);
  CHECK(strcmp(msh_http_method(h), "") == 0);
  CHECK(body_is(h, "data: ab\n"));
  CHECK_OK(msh_http_body_consume(h, 6));
  CHECK(body_is(h, "ab\n"));
  CHECK_STATUS(msh_http_body_consume(h, 4), MSH_ERANGE);
  msh_http_free(h);
}

static void test_response_to_eof(void) {
  const char *res = "HTTP/1.0 200 OK\r\n\r\nhello";
  msh_http *h = parser(MSH_HTTP_RESPONSE, 8192, 1024, 64);
  size_t used;
  int state;
  CHECK_OK(msh_http_feed(h, res, strlen(res), &used, &state));
  CHECK(state == 1 && used == strlen(res));
  CHECK(body_is(h, "hello")); /* the body so far */
  CHECK_OK(msh_http_feed(h, NULL, 0, &used, &state));
  CHECK(state == 2);
  msh_http_free(h);
}

static void test_limits(void) {
  msh_http *h = parser(MSH_HTTP_REQUEST, 8192, 10, 4);
  size_t used;
  int state;
  /* a declared length over the limit fails with the head alone */
  const char *big = "POST / HTTP/1.1\r\nContent-Length: 11\r\n\r\n";
  CHECK_STATUS(msh_http_feed(h, big, strlen(big), &used, &state), MSH_ERANGE);
  CHECK(msh_http_error_status(h) == 413);
  CHECK(strcmp(msh_http_error_name(h), "MSH_BODY_TOO_LARGE") == 0);
  CHECK(strstr(msh_last_error(), "10 bytes") != NULL);
  CHECK_STATUS(msh_http_feed(h, big, strlen(big), &used, &state), MSH_EINVAL); /* failed stays failed */
  msh_http_reset(h);
  CHECK(msh_http_error_status(h) == 0);
  /* a chunked body over the limit */
  const char *chunked = "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n12345678\r\n8\r\n12345678\r\n0\r\n\r\n";
  CHECK_STATUS(msh_http_feed(h, chunked, strlen(chunked), &used, &state), MSH_ERANGE);
  CHECK(msh_http_error_status(h) == 413);
  msh_http_reset(h);
  /* too many header lines */
  const char *many = "GET / HTTP/1.1\r\na: 1\r\nb: 2\r\nc: 3\r\nd: 4\r\ne: 5\r\n\r\n";
  CHECK_STATUS(msh_http_feed(h, many, strlen(many), &used, &state), MSH_ERANGE);
  CHECK(msh_http_error_status(h) == 431);
  CHECK(strcmp(msh_http_error_name(h), "MSH_TOO_MANY_HEADERS") == 0);
  msh_http_free(h);
  /* head bytes */
  h = parser(MSH_HTTP_REQUEST, 32, 10, 4);
  const char *longurl = "GET /aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa HTTP/1.1\r\n\r\n";
  CHECK_STATUS(msh_http_feed(h, longurl, strlen(longurl), &used, &state), MSH_ERANGE);
  CHECK(msh_http_error_status(h) == 431);
  CHECK(strcmp(msh_http_error_name(h), "HPE_HEADER_OVERFLOW") == 0);
  msh_http_free(h);
  /* bad arguments */
  CHECK_STATUS(msh_http_new(&h, 2, 1, 1, 1), MSH_EINVAL);
  CHECK_STATUS(msh_http_new(&h, 0, 0, 1, 1), MSH_EINVAL);
  CHECK_STATUS(msh_http_new(NULL, 0, 1, 1, 1), MSH_EINVAL);
  msh_http_free(NULL);
  msh_http_reset(NULL);
}

static void test_malformed(void) {
  msh_http *h = parser(MSH_HTTP_REQUEST, 8192, 1024, 64);
  size_t used;
  int state;
  const char *bad = "FROB / HTTP/1.1\r\n\r\n";
  CHECK_STATUS(msh_http_feed(h, bad, strlen(bad), &used, &state), MSH_EFORMAT);
  CHECK(msh_http_error_status(h) == 400);
  CHECK(strcmp(msh_http_error_name(h), "HPE_INVALID_METHOD") == 0);
  CHECK(strstr(msh_last_error(), "HPE_INVALID_METHOD") != NULL);
  msh_http_reset(h);
  const char *badlen = "POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n";
  CHECK_STATUS(msh_http_feed(h, badlen, strlen(badlen), &used, &state), MSH_EFORMAT);
  CHECK(strcmp(msh_http_error_name(h), "HPE_INVALID_CONTENT_LENGTH") == 0);
  msh_http_reset(h);
  const char *badchunk = "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
  CHECK_STATUS(msh_http_feed(h, badchunk, strlen(badchunk), &used, &state), MSH_EFORMAT);
  CHECK(msh_http_error_status(h) == 400);
  msh_http_reset(h);
  /* the peer closing inside a request: refused, nothing more used than given */
  CHECK_OK(msh_http_feed(h, "GE", 2, &used, &state));
  CHECK_STATUS(msh_http_feed(h, NULL, 0, &used, &state), MSH_EFORMAT);
  CHECK(used == 0);
  msh_http_reset(h);
  /* after a reset the parser reads a good request again */
  const char *ok = "GET /health HTTP/1.0\r\n\r\n";
  CHECK_OK(msh_http_feed(h, ok, strlen(ok), &used, &state));
  CHECK(state == 2 && msh_http_keep_alive(h) == 0 && msh_http_version(h) == 10);
  msh_http_free(h);
}

int main(void) {
  test_request(1 << 20);
  test_request(1);
  test_request(7);
  test_pipelined();
  test_chunked_response(1 << 20);
  test_chunked_response(1);
  test_response_to_eof();
  test_limits();
  test_malformed();
  return check_done("test_http");
}
