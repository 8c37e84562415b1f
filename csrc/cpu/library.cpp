// The CPU kernels' identity: the ABI version (weightkit._C exposes WK_ABI_VERSION, weightkit/native.py checks it).
#include "../weightkit.h"

WK_API int wk_cpu_abi_version(void) { return WK_ABI_VERSION; }
