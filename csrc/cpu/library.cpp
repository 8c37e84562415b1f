// The CPU library's identity: the ABI version weightkit/native.py checks when it loads the library.
#include "../weightkit.h"

WK_API int wk_cpu_abi_version(void) { return WK_ABI_VERSION; }
