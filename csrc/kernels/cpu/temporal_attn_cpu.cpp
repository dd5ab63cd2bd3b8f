// CPU kernels for fused temporal attention. (Placeholder until the kernels land.)
#include <c10/util/Exception.h>

#include "fvdm/kernels.h"

namespace fvdm::cpu {
void temporal_attn_fwd(const TemporalAttnFwdParams&) { TORCH_CHECK(false, "fvdm: temporal_attention CPU kernel not built yet"); }
void temporal_attn_bwd(const TemporalAttnBwdParams&) { TORCH_CHECK(false, "fvdm: temporal_attention CPU kernel not built yet"); }
}  // namespace fvdm::cpu
