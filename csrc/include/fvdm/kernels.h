// Kernel launchers. Each takes only a params struct and dispatches on params.dtype itself.
#pragma once
#include "fvdm/params.h"

#ifdef FVDM_WITH_CUDA
#include <cuda_runtime_api.h>
#elif defined(FVDM_CUDA_EMULATION)
struct CUstream_st;
using cudaStream_t = CUstream_st*;  // as cuda_runtime_api.h declares it
#endif

namespace fvdm {

namespace cpu {
void adaln_fwd(const AdalnFwdParams& p);
void adaln_bwd(const AdalnBwdParams& p);
void gated_residual_fwd(const GatedResidualFwdParams& p);
void gated_residual_bwd(const GatedResidualBwdParams& p);
void frame_combine_fwd(const FrameCombineFwdParams& p);
void frame_combine_bwd(const FrameCombineBwdParams& p);
void temporal_attn_fwd(const TemporalAttnFwdParams& p);
void temporal_attn_bwd(const TemporalAttnBwdParams& p);
}  // namespace cpu

#if defined(FVDM_WITH_CUDA) || defined(FVDM_CUDA_EMULATION)
namespace cuda {
void adaln_fwd(const AdalnFwdParams& p, cudaStream_t stream);
void adaln_bwd(const AdalnBwdParams& p, cudaStream_t stream);
void gated_residual_fwd(const GatedResidualFwdParams& p, cudaStream_t stream);
void gated_residual_bwd(const GatedResidualBwdParams& p, cudaStream_t stream);
void frame_combine_fwd(const FrameCombineFwdParams& p, cudaStream_t stream);
void frame_combine_bwd(const FrameCombineBwdParams& p, cudaStream_t stream);
void temporal_attn_fwd(const TemporalAttnFwdParams& p, cudaStream_t stream);
void temporal_attn_bwd(const TemporalAttnBwdParams& p, cudaStream_t stream);
}  // namespace cuda
#endif

}  // namespace fvdm
