/*
 * Stand-ins for TensorRT's native libraries, so that NVIDIA's real Python bindings
 * (tensorrt_bindings/tensorrt.so from the tensorrt-cuXX-bindings wheels) can be
 * imported on a machine without TensorRT or a GPU.
 *
 * The bindings link against libnvinfer.so.N, libnvonnxparser.so.N and
 * libnvinfer_plugin.so.N, but call only the C entry points below. Each one
 * returns "nothing": every factory returns NULL, so constructing a Builder or a
 * Runtime raises TypeError in Python, and no engine can ever be built. That is
 * enough to import the module and inspect its real classes, enums, methods and
 * docstrings, which is what trtq's conformance tests check.
 *
 * Build one library per soname, selecting its symbols with -DSTUB_<LIB>, e.g.
 *   gcc -shared -fPIC -DSTUB_NVINFER -Wl,-soname,libnvinfer.so.10 -o libnvinfer.so.10 stub.c
 * (scripts/trt_bindings.sh does this for N = 10 and 11). The pointer arguments
 * stand for C++ interface pointers; the ABI of a pointer is all that matters.
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#if defined(__GNUC__)
#define STUB_EXPORT __attribute__((visibility("default")))
#else
#define STUB_EXPORT
#endif

#if defined(STUB_NVINFER)
/* libnvinfer: builder, runtime and refitter factories, plugin registries. */
STUB_EXPORT void *createInferBuilder_INTERNAL(void *logger, int32_t version)
{
    (void)logger;
    (void)version;
    return NULL;
}

STUB_EXPORT void *createInferRuntime_INTERNAL(void *logger, int32_t version)
{
    (void)logger;
    (void)version;
    return NULL;
}

STUB_EXPORT void *createInferRefitter_INTERNAL(void *engine, void *logger, int32_t version)
{
    (void)engine;
    (void)logger;
    (void)version;
    return NULL;
}

STUB_EXPORT void *getPluginRegistry(void)
{
    return NULL;
}

STUB_EXPORT void *getBuilderPluginRegistry(int32_t engine_capability)
{
    (void)engine_capability;
    return NULL;
}
#endif /* STUB_NVINFER */

#if defined(STUB_NVINFER_PLUGIN)
/* libnvinfer_plugin: registering NVIDIA's bundled plugins always "fails". */
STUB_EXPORT bool initLibNvInferPlugins(void *logger, char const *lib_namespace)
{
    (void)logger;
    (void)lib_namespace;
    return false;
}
#endif /* STUB_NVINFER_PLUGIN */

#if defined(STUB_NVONNXPARSER)
/* libnvonnxparser: parser factories and the parser's version number. */
STUB_EXPORT void *createNvOnnxParser_INTERNAL(void *network, void *logger, int32_t version)
{
    (void)network;
    (void)logger;
    (void)version;
    return NULL;
}

STUB_EXPORT void *createNvOnnxParserRefitter_INTERNAL(void *refitter, void *logger,
                                                      int32_t version)
{
    (void)refitter;
    (void)logger;
    (void)version;
    return NULL;
}

STUB_EXPORT int getNvOnnxParserVersion(void)
{
    return 0;
}
#endif /* STUB_NVONNXPARSER */
