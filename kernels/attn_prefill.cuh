/* attn_prefill.cuh: the flash-attention prefill kernels' shared declarations (attn_prefill.cu
 * plans and dispatches; attn_prefill_sm90.cu holds the Hopper kernel). */
#ifndef MSH_ATTN_PREFILL_CUH
#define MSH_ATTN_PREFILL_CUH

#include "msh_mma.cuh"

namespace msh {

/* whether this build has the sm_90a kernel and the current device runs it (compute capability 9) */
bool attn_prefill_sm90_available();

/* the Hopper kernel: 128 x 128 block tiles (two warpgroups of 64 query rows, 128-key tiles), keys
 * in `splits` chunks of `chunk` (a multiple of 128); with splits > 1 the partials go to ml and acc
 * as in attn_prefill.cu */
cudaError_t attn_prefill_sm90(cudaStream_t s, const msh_k_attn *a, int splits, int64_t chunk, float2 *ml,
                              float *acc);

} // namespace msh

#endif
