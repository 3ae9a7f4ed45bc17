// Running a traced lily_ext model from C++ (libtorch): the lily ops live in lily_ext's _C library,
// which registers them when it is loaded. Link it, or dlopen it before torch::jit::load.
//
//   load_torchscript traced.pt /path/to/lily_ext/_C.cpython-*.so
//
// Build it with export/examples/CMakeLists.txt against the libtorch lily_ext was built with (e.g.
// the pip wheel's torch/include and torch/lib: -DTORCH_DIR=.../site-packages/torch).
#include <dlfcn.h>
#include <torch/script.h>

#include <cstdio>

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s traced.pt LILY_EXT_C_LIBRARY\n", argv[0]);
    return 2;
  }
  // _C.so needs only libtorch (no Python): loading it runs TORCH_LIBRARY(lily, ...).
  if (!dlopen(argv[2], RTLD_NOW | RTLD_GLOBAL)) {
    std::fprintf(stderr, "dlopen failed: %s\n", dlerror());
    return 1;
  }
  torch::jit::Module module = torch::jit::load(argv[1]);
  torch::NoGradGuard no_grad;
  auto out = module.forward({torch::randn({2, 5, 16})}).toTensor();
  std::printf("output %s\n", c10::str(out.sizes()).c_str());
  return 0;
}
