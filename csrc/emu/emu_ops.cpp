// Control of the CUDA emulation from Python: the device profile, the warp schedule, and the
// log of kernel launches (tests assert which kernel variant a case reached).
#include <torch/library.h>

#include <string>
#include <vector>

namespace fvdm::emu {
void set_profile(const std::string& name);
std::vector<std::string> profiles();
void set_schedule(int64_t order, int64_t workers);
std::vector<std::string> take_launches();
}  // namespace fvdm::emu

TORCH_LIBRARY_FRAGMENT(fvdm_cuda_emu, m) {
  m.def("set_profile(str name) -> ()", &fvdm::emu::set_profile);
  m.def("profiles() -> str[]", &fvdm::emu::profiles);
  m.def("set_schedule(int order, int workers) -> ()", &fvdm::emu::set_schedule);
  m.def("take_launches() -> str[]", &fvdm::emu::take_launches);
}
