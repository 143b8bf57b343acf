/* bpe_internal.h: test hooks of the byte-level BPE tokenizer (not part of the public API). */
#ifndef MSH_BPE_INTERNAL_H
#define MSH_BPE_INTERNAL_H

#include "moonshard.h"

/* Splits text as msh_bpe_encode does (added tokens, then the pre-tokenizer patterns) without
 * merging: ends[k] is the byte offset where piece k ends. MSH_ERANGE when cap is too small;
 * *n_out then holds the number of pieces. */
msh_status msh_bpe_pieces(msh_bpe *b, const char *text, size_t len, int flags, uint64_t *ends, int cap,
                          int *n_out);

#endif
