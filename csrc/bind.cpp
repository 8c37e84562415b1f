// weightkit._C: the Python binding of the plain C functions of csrc/weightkit.h (pybind11; links no libtorch).
//
// Why this shape:
// * Portability. _C includes no torch header and links no libtorch: tensors cross as data pointers (Python ints,
//   tensor.data_ptr()), sizes and the dtype codes of weightkit.h; the callers (weightkit/backends/cpu, .../cuda)
//   allocate with torch and pass pointers. So one build loads under every torch release (tests/test_portable.py).
//   It is a CPython extension, so it is built per Python version (the wheel is cp3xx, like torch's own).
// * Signatures checked at compile time. Every binding is generated from the C declaration itself (bind_cpu /
//   bind_cuda below derive the Python signature from the function's type: a pointer parameter becomes an int, any
//   other parameter keeps its C type), so a change of weightkit.h either compiles into the matching binding or fails
//   to compile; pybind11 rejects a call with the wrong number of arguments or a float where an int is declared. (The
//   ctypes table this replaces was a hand-copied list of argument types: a mismatch corrupted memory silently.)
// * The CPU kernels (csrc/cpu/*.cpp) are compiled into _C: if _C imports, they are there.
// * The CUDA kernels stay in libweightkit_cuda.so (nvcc, CUDA runtime linked statically), which _C opens at run time
//   (load_cuda: dlopen + dlsym into pointers typed `decltype(&wk_cuda_...)` from the header). _C itself then never
//   needs CUDA: a missing library, one of another ABI version or a driver too old for it is a clear message from
//   weightkit.native / `python -m weightkit info` and the cpu backend keeps working, instead of an ImportError of _C.
// * Each kernel call releases the GIL (the CPU kernels run their own threads; CUDA calls only queue launches).
//
// Host cost: a call is one pybind11 dispatch (argument conversion of ~10 ints), measured in bench/test_bench_host.py.
#include <dlfcn.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "weightkit.h"

namespace py = pybind11;

namespace {

// A C parameter as Python passes it: pointers (tensor data, cudaStream_t) as integers, everything else as is.
template <typename T>
struct PyArg {
  using type = T;
};
template <typename T>
struct PyArg<T*> {
  using type = std::uintptr_t;
};
template <typename T>
using py_arg_t = typename PyArg<T>::type;

template <typename T>
T from_py(py_arg_t<T> value) {
  if constexpr (std::is_pointer_v<T>) {
    return reinterpret_cast<T>(value);
  } else {
    return value;
  }
}

std::vector<std::string>& cpu_names() {
  static std::vector<std::string> names;
  return names;
}

std::vector<std::string>& cuda_names() {
  static std::vector<std::string> names;
  return names;
}

// m.<name>(...) calls fn; its Python signature comes from fn's C type.
template <typename R, typename... Args>
void bind_cpu(py::module_& m, const char* c_name, R (*fn)(Args...)) {
  const std::string name = std::string(c_name).substr(sizeof("wk_cpu_") - 1);
  cpu_names().push_back(c_name);
  m.def(name.c_str(), [fn](py_arg_t<Args>... args) { return fn(from_py<Args>(args)...); },
        py::call_guard<py::gil_scoped_release>());
}

// ---- the CUDA library, opened at run time -------------------------------------------------------------------------

// The kernels (bound one to one by WK_BIND_CUDA below), after the four library functions (bound by hand: two of them
// return strings); resolved in this order, so a stale library's error names the first missing ones first.
#define WK_CUDA_KERNEL_FUNCTIONS(X)                                                                               \
  X(stochastic_round_int8) X(int8_sr_update) X(dequantize_int8) X(int8_gemv) X(quantize_int4) X(dequantize_int4) \
  X(int4_gemv) X(low_rank_adam) X(bf16_parts) X(memory_lookup_forward) X(memory_lookup_backward)                 \
  X(memory_rank_keys) X(memory_segment_sum) X(dict_bitmask_to_dense_t) X(dict_bitmask_gather_dense_t)
#define WK_CUDA_FUNCTIONS(X) X(abi_version) X(archs) X(probe) X(error_string) WK_CUDA_KERNEL_FUNCTIONS(X)

// One pointer per function, typed from its declaration in weightkit.h.
struct CudaLibrary {
  void* handle = nullptr;
  std::string path;
#define WK_SLOT(name) decltype(&wk_cuda_##name) name = nullptr;
  WK_CUDA_FUNCTIONS(WK_SLOT)
#undef WK_SLOT
};

CudaLibrary& cuda_library() {
  static CudaLibrary lib;
  return lib;
}

// The slot (a typed function pointer of CudaLibrary) is read at call time: null until load_cuda succeeded.
template <typename R, typename... Args>
void bind_cuda(py::module_& m, const char* c_name, R (*CudaLibrary::*slot)(Args...)) {
  const std::string name = std::string(c_name).substr(sizeof("wk_cuda_") - 1);
  cuda_names().push_back(c_name);
  m.def(name.c_str(), [slot](py_arg_t<Args>... args) {
    R (*fn)(Args...) = cuda_library().*slot;
    if (fn == nullptr) throw std::runtime_error("weightkit: the CUDA kernel library is not loaded");
    py::gil_scoped_release release;
    return fn(from_py<Args>(args)...);
  });
}

// Opens the CUDA library at `path`: "" on success, else why not (the library stays closed).
std::string load_cuda(const std::string& path) {
  CudaLibrary& lib = cuda_library();
  if (lib.handle != nullptr) return lib.path == path ? "" : "another CUDA kernel library is loaded: " + lib.path;
  dlerror();
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    const char* err = dlerror();
    return err != nullptr ? err : "dlopen failed";
  }
  CudaLibrary found;
  std::string missing;
#define WK_RESOLVE(name)                                                                              \
  found.name = reinterpret_cast<decltype(found.name)>(dlsym(handle, "wk_cuda_" #name));                \
  if (found.name == nullptr) missing += std::string(missing.empty() ? "" : ", ") + "wk_cuda_" #name;
  WK_CUDA_FUNCTIONS(WK_RESOLVE)
#undef WK_RESOLVE
  if (!missing.empty()) {
    dlclose(handle);
    return "it lacks " + missing + " (built from other sources than this weightkit: rebuild)";
  }
  const int version = found.abi_version();
  if (version != WK_ABI_VERSION) {
    dlclose(handle);
    return "it has ABI version " + std::to_string(version) + ", this weightkit needs " +
           std::to_string(WK_ABI_VERSION) + " (rebuild)";
  }
  found.handle = handle;
  found.path = path;
  lib = found;
  return "";
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "weightkit's compiled kernels: the C functions of csrc/weightkit.h (see csrc/bind.cpp)";
  m.attr("ABI_VERSION") = WK_ABI_VERSION;

  py::module_ cpu = m.def_submodule("cpu", "the CPU kernels (csrc/cpu), compiled into weightkit._C");
#define WK_BIND_CPU(name) bind_cpu(cpu, #name, &name);
  WK_BIND_CPU(wk_cpu_abi_version)
  WK_BIND_CPU(wk_cpu_stochastic_round_int8)
  WK_BIND_CPU(wk_cpu_int8_sr_update)
  WK_BIND_CPU(wk_cpu_int8_matvec)
  WK_BIND_CPU(wk_cpu_int8_dequantize_rows)
  WK_BIND_CPU(wk_cpu_quantize_int4)
  WK_BIND_CPU(wk_cpu_dequantize_int4)
  WK_BIND_CPU(wk_cpu_low_rank_adam)
  WK_BIND_CPU(wk_cpu_blockwise8bit_adam)
  WK_BIND_CPU(wk_cpu_memory_lookup_forward)
  WK_BIND_CPU(wk_cpu_memory_lookup_backward)
  WK_BIND_CPU(wk_cpu_dict_bitmask_forward)
  WK_BIND_CPU(wk_cpu_dict_bitmask_backward)
  WK_BIND_CPU(wk_cpu_dict_bitmask_to_dense_t)
  WK_BIND_CPU(wk_cpu_dict_bitmask_gather_dense_t)
#undef WK_BIND_CPU

  py::module_ cuda = m.def_submodule("cuda", "the CUDA kernels of libweightkit_cuda.so, once load_cuda succeeded");
#define WK_BIND_CUDA(name) bind_cuda(cuda, "wk_cuda_" #name, &CudaLibrary::name);
  WK_BIND_CUDA(abi_version)
  WK_BIND_CUDA(probe)
  WK_CUDA_KERNEL_FUNCTIONS(WK_BIND_CUDA)
#undef WK_BIND_CUDA
  // the two functions that return strings
  cuda_names().push_back("wk_cuda_archs");
  cuda.def("archs", []() -> py::object {
    auto fn = cuda_library().archs;
    return fn == nullptr ? py::object(py::none()) : py::object(py::str(fn()));
  });
  cuda_names().push_back("wk_cuda_error_string");
  cuda.def("error_string", [](int error) -> std::string {
    auto fn = cuda_library().error_string;
    return fn == nullptr ? "CUDA error " + std::to_string(error) : std::string(fn(error));
  });
  cuda.def("loaded_path", []() -> py::object {
    const CudaLibrary& lib = cuda_library();
    return lib.handle == nullptr ? py::object(py::none()) : py::object(py::str(lib.path));
  });

  m.def("load_cuda", &load_cuda, py::arg("path"),
        "Open libweightkit_cuda.so at path: '' on success, else why not (nothing loaded).");
  // the C functions bound here, for the tests that compare them with weightkit.h and the libraries' symbols
  py::list cpu_list, cuda_list;
  for (const std::string& name : cpu_names()) cpu_list.append(name);
  for (const std::string& name : cuda_names()) cuda_list.append(name);
  m.attr("CPU_FUNCTIONS") = py::tuple(cpu_list);
  m.attr("CUDA_FUNCTIONS") = py::tuple(cuda_list);
}
