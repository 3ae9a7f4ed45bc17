// Serving a lily_ext model from C++ with ONNX Runtime: load the custom-op library by path, run.
//
//   serve_onnx MODEL.onnx /path/to/liblily_ort.so TOKEN_ID...
//
// Feeds input_ids = [[TOKEN_ID...]] and an all-ones attention_mask, prints the first output's
// values one per line. Build it with export/examples/CMakeLists.txt against ORT's C/C++ headers
// and any libonnxruntime.so (a release archive's, or the pip wheel's).
#include <onnxruntime_cxx_api.h>

#include <cstdio>
#include <cstdlib>
#include <vector>

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s MODEL.onnx LIBLILY_ORT.so TOKEN_ID...\n", argv[0]);
    return 2;
  }
  try {
    Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "lily_ext");
    Ort::SessionOptions options;
    options.RegisterCustomOpsLibrary(argv[2]);  // registers domain "lily" (RoutedMix)
    Ort::Session session(env, argv[1], options);

    std::vector<int64_t> ids;
    for (int i = 3; i < argc; ++i) ids.push_back(std::atoll(argv[i]));
    std::vector<int64_t> mask(ids.size(), 1);
    const std::vector<int64_t> shape{1, int64_t(ids.size())};
    auto memory = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    std::vector<Ort::Value> inputs;
    inputs.push_back(Ort::Value::CreateTensor<int64_t>(memory, ids.data(), ids.size(), shape.data(), shape.size()));
    inputs.push_back(Ort::Value::CreateTensor<int64_t>(memory, mask.data(), mask.size(), shape.data(), shape.size()));
    const char* input_names[] = {"input_ids", "attention_mask"};
    Ort::AllocatorWithDefaultOptions allocator;
    auto output_name = session.GetOutputNameAllocated(0, allocator);
    const char* output_names[] = {output_name.get()};
    auto outputs = session.Run(Ort::RunOptions{nullptr}, input_names, inputs.data(), inputs.size(), output_names, 1);
    const float* values = outputs[0].GetTensorData<float>();
    const size_t count = outputs[0].GetTensorTypeAndShapeInfo().GetElementCount();
    for (size_t i = 0; i < count; ++i) std::printf("%.6f\n", values[i]);
  } catch (const Ort::Exception& e) {
    std::fprintf(stderr, "onnxruntime error: %s\n", e.what());
    return 1;
  }
  return 0;
}
