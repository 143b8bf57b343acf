/*
 * ref_llama2c.c: a plain, single-file, single-threaded C11 reference for Llama
 * inference on llama2.c checkpoints (e.g. stories260K).
 *
 * Purpose:
 *   1. an implementation independent of moonshard to compare outputs against;
 *   2. the "plain single-file C" baseline speed for moonshard's CPU backend.
 *
 * Deliberately plain: f32 everywhere, matmul as a straightforward double loop,
 * no BLAS, no threads, no intrinsics. Build like a user would:
 *
 *   cc -O3 -march=native -o build/ref_llama2c tools/bench/ref_llama2c.c -lm
 *
 * Usage: ref_llama2c CHECKPOINT TOKENIZER STEPS
 *   Starts from BOS (token 1) alone and generates STEPS tokens greedily
 *   (argmax), stopping early if BOS is produced. The decoded text goes to
 *   stdout; one JSON line with the timing of the generation loop goes to stderr:
 *   {"impl":"ref_llama2c","tokens":N,"seconds":S,"tok_s":X}
 *
 * Architecture (Llama 2):
 *   x = embed[token]
 *   per layer:
 *     h = rmsnorm(x) * rms_att            (eps 1e-5)
 *     q = wq h, k = wk h, v = wv h        (k, v have n_kv_heads heads)
 *     rotate (q[2i], q[2i+1]) and (k[2i], k[2i+1]) by pos * 10000^(-2i'/head_size),
 *       where i' indexes the pair within its head
 *     attention per head over positions 0..pos, scale 1/sqrt(head_size),
 *       query head h reads kv head h / (n_heads / n_kv_heads)
 *     x += wo att
 *     h = rmsnorm(x) * rms_ffn
 *     x += w2 (silu(w1 h) * (w3 h))
 *   logits = cls (rmsnorm(x) * rms_final), cls = embed when vocab_size > 0 in the header
 *
 * Checkpoint layout: 7 int32 header (dim, hidden_dim, n_layers, n_heads,
 * n_kv_heads, vocab_size, seq_len), then f32 tensors: embed (vocab,dim),
 * rms_att (L,dim), wq (L,dim,dim), wk (L,kv_dim,dim), wv (L,kv_dim,dim),
 * wo (L,dim,dim), rms_ffn (L,dim), w1 (L,hidden,dim), w2 (L,dim,hidden),
 * w3 (L,hidden,dim), rms_final (dim), two unused RoPE tables of
 * seq_len*head_size/2 floats each, then the classifier (vocab,dim) if the
 * header's vocab_size is negative.
 *
 * Tokenizer layout: int32 max_token_length, then per token: f32 score,
 * int32 length, the bytes.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define BOS_ID 1
#define HEADER_INTS 7
#define MAX_DIM_LIMIT (1 << 20) /* sanity bound for any single header field */

/* ---------------------------------------------------------------- errors */

static const char *g_prog = "ref_llama2c";

static void die(const char *fmt, const char *arg)
{
    fprintf(stderr, "%s: ", g_prog);
    fprintf(stderr, fmt, arg);
    fputc('\n', stderr);
    exit(1);
}

static void *xcalloc(size_t n, size_t size)
{
    if (n == 0) n = 1;
    void *p = calloc(n, size);
    if (!p) die("out of memory (%s)", "calloc");
    return p;
}

/* Read a whole file into memory. Returns the byte count in *len. */
static unsigned char *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "%s: cannot open %s: %s\n", g_prog, path, strerror(errno));
        exit(1);
    }
    if (fseek(f, 0, SEEK_END) != 0) die("cannot seek in %s", path);
    long end = ftell(f);
    if (end < 0) die("cannot tell the size of %s", path);
    if (fseek(f, 0, SEEK_SET) != 0) die("cannot seek in %s", path);
    size_t n = (size_t)end;
    unsigned char *buf = xcalloc(n + 1, 1);
    if (n > 0 && fread(buf, 1, n, f) != n) die("short read on %s", path);
    fclose(f);
    *len = n;
    return buf;
}

/* ---------------------------------------------------------------- model */

typedef struct {
    int dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len;
    int shared_classifier;
    int head_size, kv_dim;
} Config;

typedef struct {
    const float *embed;     /* (vocab, dim) */
    const float *rms_att;   /* (L, dim) */
    const float *wq;        /* (L, dim, dim) */
    const float *wk;        /* (L, kv_dim, dim) */
    const float *wv;        /* (L, kv_dim, dim) */
    const float *wo;        /* (L, dim, dim) */
    const float *rms_ffn;   /* (L, dim) */
    const float *w1;        /* (L, hidden, dim) */
    const float *w2;        /* (L, dim, hidden) */
    const float *w3;        /* (L, hidden, dim) */
    const float *rms_final; /* (dim) */
    const float *cls;       /* (vocab, dim) */
} Weights;

typedef struct {
    float *x, *h, *h2;     /* (dim) */
    float *q, *k, *v;      /* q: (dim), k, v: (kv_dim) */
    float *att_out;        /* (dim) */
    float *ff1, *ff3;      /* (hidden) */
    float *scores;         /* (seq_len) */
    float *logits;         /* (vocab) */
    float *key_cache;      /* (L, seq_len, kv_dim) */
    float *value_cache;    /* (L, seq_len, kv_dim) */
} State;

static void load_model(const char *path, Config *c, Weights *w, unsigned char **blob_out)
{
    size_t len = 0;
    unsigned char *blob = read_file(path, &len);
    if (len < HEADER_INTS * sizeof(int32_t))
        die("%s: file too small for a llama2.c checkpoint header (28 bytes)", path);

    int32_t hdr[HEADER_INTS];
    memcpy(hdr, blob, sizeof hdr);
    c->dim = hdr[0];
    c->hidden_dim = hdr[1];
    c->n_layers = hdr[2];
    c->n_heads = hdr[3];
    c->n_kv_heads = hdr[4];
    c->shared_classifier = hdr[5] > 0;
    {   /* a negative vocab_size means "classifier stored separately" */
        int64_t vs = hdr[5] < 0 ? -(int64_t)hdr[5] : (int64_t)hdr[5];
        c->vocab_size = vs > MAX_DIM_LIMIT ? -1 : (int)vs;
    }
    c->seq_len = hdr[6];

    const int fields[] = { c->dim, c->hidden_dim, c->n_layers, c->n_heads,
                           c->n_kv_heads, c->vocab_size, c->seq_len };
    const char *names[] = { "dim", "hidden_dim", "n_layers", "n_heads",
                            "n_kv_heads", "vocab_size", "seq_len" };
    for (int i = 0; i < HEADER_INTS; i++) {
        if (fields[i] <= 0 || fields[i] > MAX_DIM_LIMIT) {
            fprintf(stderr, "%s: %s: bad header: %s = %d (expected 1..%d)\n",
                    g_prog, path, names[i], (int)hdr[i], MAX_DIM_LIMIT);
            exit(1);
        }
    }
    if (c->dim % c->n_heads != 0)
        die("%s: bad header: dim is not a multiple of n_heads", path);
    if (c->n_kv_heads > c->n_heads || c->n_heads % c->n_kv_heads != 0)
        die("%s: bad header: n_heads is not a multiple of n_kv_heads", path);
    c->head_size = c->dim / c->n_heads;
    if (c->head_size % 2 != 0)
        die("%s: bad header: head_size (dim / n_heads) is odd; RoPE needs pairs", path);
    c->kv_dim = c->head_size * c->n_kv_heads;

    /* Expected size. Every field is <= 2^20, but L*H*D*3*4 could still pass
       2^63, so check the size in floating point before the exact int64 sum. */
    {
        double dL = c->n_layers, dD = c->dim, dH = c->hidden_dim, dV = c->vocab_size;
        double dS = c->seq_len, dKV = c->kv_dim;
        double approx = 4.0 * (2.0 * dV * dD + dL * dD * (2.0 * dD + 2.0 * dKV + 3.0 * dH + 2.0)
                               + dD + dS * dD) + 28.0;
        if (approx > 1e18)
            die("%s: bad header: the sizes it declares are absurdly large", path);
    }
    int64_t L = c->n_layers, D = c->dim, H = c->hidden_dim, V = c->vocab_size;
    int64_t KV = c->kv_dim, S = c->seq_len, HS = c->head_size;
    int64_t floats = V * D                 /* embed */
                   + L * D                 /* rms_att */
                   + L * D * D             /* wq */
                   + L * KV * D * 2        /* wk, wv */
                   + L * D * D             /* wo */
                   + L * D                 /* rms_ffn */
                   + L * H * D * 3         /* w1, w2, w3 */
                   + D                     /* rms_final */
                   + S * (HS / 2) * 2      /* legacy RoPE tables */
                   + (c->shared_classifier ? 0 : V * D);
    int64_t expect = (int64_t)(HEADER_INTS * sizeof(int32_t)) + floats * (int64_t)sizeof(float);
    if ((int64_t)len != expect) {
        fprintf(stderr,
                "%s: %s: file size %lld does not match the header "
                "(dim=%d hidden_dim=%d n_layers=%d n_heads=%d n_kv_heads=%d vocab_size=%d seq_len=%d "
                "needs %lld bytes)\n",
                g_prog, path, (long long)len, c->dim, c->hidden_dim, c->n_layers, c->n_heads,
                c->n_kv_heads, (int)hdr[5], c->seq_len, (long long)expect);
        exit(1);
    }

    /* The blob was allocated by calloc, so offset 28 is 4-byte aligned. */
    const float *p = (const float *)(blob + HEADER_INTS * sizeof(int32_t));
    w->embed = p;     p += V * D;
    w->rms_att = p;   p += L * D;
    w->wq = p;        p += L * D * D;
    w->wk = p;        p += L * KV * D;
    w->wv = p;        p += L * KV * D;
    w->wo = p;        p += L * D * D;
    w->rms_ffn = p;   p += L * D;
    w->w1 = p;        p += L * H * D;
    w->w2 = p;        p += L * D * H;
    w->w3 = p;        p += L * H * D;
    w->rms_final = p; p += D;
    p += S * (HS / 2) * 2; /* skip the legacy RoPE tables */
    w->cls = c->shared_classifier ? w->embed : p;

    *blob_out = blob;
}

static void alloc_state(State *s, const Config *c)
{
    size_t cache = (size_t)c->n_layers * (size_t)c->seq_len * (size_t)c->kv_dim;
    s->x = xcalloc((size_t)c->dim, sizeof(float));
    s->h = xcalloc((size_t)c->dim, sizeof(float));
    s->h2 = xcalloc((size_t)c->dim, sizeof(float));
    s->q = xcalloc((size_t)c->dim, sizeof(float));
    s->k = xcalloc((size_t)c->kv_dim, sizeof(float));
    s->v = xcalloc((size_t)c->kv_dim, sizeof(float));
    s->att_out = xcalloc((size_t)c->dim, sizeof(float));
    s->ff1 = xcalloc((size_t)c->hidden_dim, sizeof(float));
    s->ff3 = xcalloc((size_t)c->hidden_dim, sizeof(float));
    s->scores = xcalloc((size_t)c->seq_len, sizeof(float));
    s->logits = xcalloc((size_t)c->vocab_size, sizeof(float));
    s->key_cache = xcalloc(cache, sizeof(float));
    s->value_cache = xcalloc(cache, sizeof(float));
}

static void free_state(State *s)
{
    free(s->x); free(s->h); free(s->h2); free(s->q); free(s->k); free(s->v);
    free(s->att_out); free(s->ff1); free(s->ff3); free(s->scores); free(s->logits);
    free(s->key_cache); free(s->value_cache);
}

/* ---------------------------------------------------------------- kernels */

/* out = x / rms(x) * g, eps 1e-5 */
static void rms_norm(float *out, const float *x, const float *g, int n)
{
    float ss = 0.0f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    float inv = 1.0f / sqrtf(ss / (float)n + 1e-5f);
    for (int i = 0; i < n; i++) out[i] = x[i] * inv * g[i];
}

/* out (rows) = W (rows, cols) @ x (cols): the plain double loop. */
static void matvec(float *out, const float *W, const float *x, int rows, int cols)
{
    for (int r = 0; r < rows; r++) {
        const float *row = W + (size_t)r * (size_t)cols;
        float acc = 0.0f;
        for (int c = 0; c < cols; c++) acc += row[c] * x[c];
        out[r] = acc;
    }
}

/* Rotate consecutive pairs (v[2i], v[2i+1]) of each head by pos * theta_i,
   theta_i = 10000^(-2i/head_size), i the pair index inside the head. */
static void rope(float *v, int n, int head_size, int pos)
{
    for (int j = 0; j < n; j += 2) {
        int in_head = j % head_size;
        float freq = 1.0f / powf(10000.0f, (float)in_head / (float)head_size);
        float angle = (float)pos * freq;
        float c = cosf(angle), s = sinf(angle);
        float a = v[j], b = v[j + 1];
        v[j] = a * c - b * s;
        v[j + 1] = a * s + b * c;
    }
}

static void softmax(float *x, int n)
{
    float mx = x[0];
    for (int i = 1; i < n; i++) if (x[i] > mx) mx = x[i];
    float sum = 0.0f;
    for (int i = 0; i < n; i++) { x[i] = expf(x[i] - mx); sum += x[i]; }
    for (int i = 0; i < n; i++) x[i] /= sum;
}

/* One decoding step: feed `token` at position `pos`, leave logits in s->logits. */
static void forward(const Config *c, const Weights *w, State *s, int token, int pos)
{
    const int D = c->dim, H = c->hidden_dim, KV = c->kv_dim, HS = c->head_size;
    const int group = c->n_heads / c->n_kv_heads;
    const float scale = 1.0f / sqrtf((float)HS);

    memcpy(s->x, w->embed + (size_t)token * (size_t)D, (size_t)D * sizeof(float));

    for (int l = 0; l < c->n_layers; l++) {
        /* attention block */
        rms_norm(s->h, s->x, w->rms_att + (size_t)l * D, D);
        matvec(s->q, w->wq + (size_t)l * D * D, s->h, D, D);
        matvec(s->k, w->wk + (size_t)l * KV * D, s->h, KV, D);
        matvec(s->v, w->wv + (size_t)l * KV * D, s->h, KV, D);
        rope(s->q, D, HS, pos);
        rope(s->k, KV, HS, pos);

        float *kc = s->key_cache + (size_t)l * c->seq_len * KV;
        float *vc = s->value_cache + (size_t)l * c->seq_len * KV;
        memcpy(kc + (size_t)pos * KV, s->k, (size_t)KV * sizeof(float));
        memcpy(vc + (size_t)pos * KV, s->v, (size_t)KV * sizeof(float));

        for (int hd = 0; hd < c->n_heads; hd++) {
            const float *q = s->q + hd * HS;
            const int kvh = hd / group;
            for (int t = 0; t <= pos; t++) {
                const float *k = kc + (size_t)t * KV + kvh * HS;
                float dot = 0.0f;
                for (int i = 0; i < HS; i++) dot += q[i] * k[i];
                s->scores[t] = dot * scale;
            }
            softmax(s->scores, pos + 1);
            float *o = s->att_out + hd * HS;
            for (int i = 0; i < HS; i++) o[i] = 0.0f;
            for (int t = 0; t <= pos; t++) {
                const float *v = vc + (size_t)t * KV + kvh * HS;
                const float a = s->scores[t];
                for (int i = 0; i < HS; i++) o[i] += a * v[i];
            }
        }
        matvec(s->h2, w->wo + (size_t)l * D * D, s->att_out, D, D);
        for (int i = 0; i < D; i++) s->x[i] += s->h2[i];

        /* feed-forward block (SwiGLU) */
        rms_norm(s->h, s->x, w->rms_ffn + (size_t)l * D, D);
        matvec(s->ff1, w->w1 + (size_t)l * H * D, s->h, H, D);
        matvec(s->ff3, w->w3 + (size_t)l * H * D, s->h, H, D);
        for (int i = 0; i < H; i++) {
            float g = s->ff1[i];
            s->ff1[i] = g / (1.0f + expf(-g)) * s->ff3[i];
        }
        matvec(s->h2, w->w2 + (size_t)l * D * H, s->ff1, D, H);
        for (int i = 0; i < D; i++) s->x[i] += s->h2[i];
    }

    rms_norm(s->h, s->x, w->rms_final, D);
    matvec(s->logits, w->cls, s->h, c->vocab_size, D);
}

static int argmax(const float *x, int n)
{
    int best = 0;
    for (int i = 1; i < n; i++) if (x[i] > x[best]) best = i;
    return best;
}

/* ---------------------------------------------------------------- tokenizer */

typedef struct {
    int n;
    unsigned char **piece;
    int *len;
} Vocab;

static void load_vocab(const char *path, Vocab *v, int vocab_size)
{
    size_t len = 0;
    unsigned char *buf = read_file(path, &len);
    size_t off = 0;
    int32_t max_len = 0;
    if (len < sizeof(int32_t)) die("%s: tokenizer file too small", path);
    memcpy(&max_len, buf, sizeof max_len);
    off += sizeof max_len;
    if (max_len <= 0 || max_len > 65536) die("%s: bad max_token_length in tokenizer header", path);

    v->n = vocab_size;
    v->piece = xcalloc((size_t)vocab_size, sizeof *v->piece);
    v->len = xcalloc((size_t)vocab_size, sizeof *v->len);
    for (int i = 0; i < vocab_size; i++) {
        int32_t n = 0;
        if (len - off < sizeof(float) + sizeof(int32_t)) {
            fprintf(stderr, "%s: %s: truncated at token %d of %d\n", g_prog, path, i, vocab_size);
            exit(1);
        }
        off += sizeof(float); /* score: unused for decoding */
        memcpy(&n, buf + off, sizeof n);
        off += sizeof n;
        if (n < 0 || n > max_len || (size_t)n > len - off) {
            fprintf(stderr, "%s: %s: bad length %d for token %d\n", g_prog, path, (int)n, i);
            exit(1);
        }
        v->piece[i] = xcalloc((size_t)n + 1, 1);
        memcpy(v->piece[i], buf + off, (size_t)n);
        v->len[i] = n;
        off += (size_t)n;
    }
    free(buf);
}

static void free_vocab(Vocab *v)
{
    for (int i = 0; i < v->n; i++) free(v->piece[i]);
    free(v->piece);
    free(v->len);
}

static int hexval(unsigned char ch)
{
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
    return -1;
}

/* Write the text of `token` (which follows `prev`) to out. */
static void emit_piece(FILE *out, const Vocab *v, int prev, int token)
{
    const unsigned char *p = v->piece[token];
    int n = v->len[token];
    /* byte-fallback pieces "<0xNN>" stand for one raw byte */
    if (n == 6 && p[0] == '<' && p[1] == '0' && p[2] == 'x' && p[5] == '>') {
        int hi = hexval(p[3]), lo = hexval(p[4]);
        if (hi >= 0 && lo >= 0) {
            fputc(hi * 16 + lo, out);
            return;
        }
    }
    /* the first piece after BOS drops its leading space (the dummy prefix) */
    if (prev == BOS_ID && n > 0 && p[0] == ' ') { p++; n--; }
    if (n > 0) fwrite(p, 1, (size_t)n, out);
}

/* ---------------------------------------------------------------- main */

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: %s CHECKPOINT TOKENIZER STEPS\n", g_prog);
        return 2;
    }
    char *end = NULL;
    errno = 0;
    long steps = strtol(argv[3], &end, 10);
    if (errno != 0 || end == argv[3] || *end != '\0' || steps < 0) {
        fprintf(stderr, "%s: STEPS must be a non-negative integer, got '%s'\n", g_prog, argv[3]);
        return 2;
    }

    Config c;
    Weights w;
    unsigned char *blob = NULL;
    load_model(argv[1], &c, &w, &blob);
    Vocab vocab;
    load_vocab(argv[2], &vocab, c.vocab_size);

    /* position 0 holds BOS; STEPS generated tokens occupy positions 1..STEPS,
       the last of which is never fed back, so STEPS <= seq_len fits. */
    if (steps > c.seq_len) {
        fprintf(stderr, "%s: STEPS %ld exceeds the context of %d; clamping\n", g_prog, steps, c.seq_len);
        steps = c.seq_len;
    }

    State s;
    alloc_state(&s, &c);
    int *out = xcalloc((size_t)steps + 1, sizeof(int));

    int token = BOS_ID, produced = 0;
    double t0 = now_seconds();
    for (int pos = 0; pos < steps; pos++) {
        forward(&c, &w, &s, token, pos);
        int next = argmax(s.logits, c.vocab_size);
        if (next == BOS_ID) break; /* BOS marks the end of a sequence */
        out[produced++] = next;
        token = next;
    }
    double secs = now_seconds() - t0;

    int prev = BOS_ID;
    for (int i = 0; i < produced; i++) {
        emit_piece(stdout, &vocab, prev, out[i]);
        prev = out[i];
    }
    fflush(stdout);

    fprintf(stderr, "{\"impl\":\"ref_llama2c\",\"tokens\":%d,\"seconds\":%.6f,\"tok_s\":%.3f}\n",
            produced, secs, secs > 0 ? produced / secs : 0.0);

    free(out);
    free_state(&s);
    free_vocab(&vocab);
    free(blob);
    return 0;
}
