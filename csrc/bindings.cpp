// The one module definition of megatron_rlvr._C (setup.py compiles every csrc/*.cpp into it): every C++
// helper is exposed here, its implementation lives in its own file.
#include <torch/extension.h>

#include "partition.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron-rlvr C++ helpers; each has a pure-Python twin in the package";
  m.def("partition", &megatron_rlvr::partition, pybind11::arg("weights"), pybind11::arg("k"),
        pybind11::arg("method") = "kk", pybind11::arg("equal_size") = false,
        "Split items into k parts of nearly equal weight sum; see megatron_rlvr.data.partition.partition",
        pybind11::call_guard<pybind11::gil_scoped_release>());
}
