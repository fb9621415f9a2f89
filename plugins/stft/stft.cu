// Short-time Fourier transform of real signals, as ONNX STFT (opset 17) defines it with
// onesided=1:
//
//   out[b, f, k, 0] + i * out[b, f, k, 1]
//       = sum_{n < N} signal[b, f * step + n] * window[n] * exp(-2 pi i k n / N)
//
//   signal [batch, signal_length] float32 (ONNX's trailing dimension of 1 changes nothing in
//   memory), window [N] float32 or NULL (rectangular), N = frame_length, step = frame_step,
//   out [batch, n_frames, N / 2 + 1, 2] float32, n_frames = 1 + (signal_length - N) / step.
//
// One thread block per (frame, batch): it stages the windowed frame and a table of N twiddle
// factors in shared memory, then each thread accumulates whole DFT bins. The twiddle index
// k * n mod N is advanced incrementally, so every factor comes from the exact table entry
// (no growing phase error), and sums run in float with fused multiply-adds. Work is
// O(N^2 / 2) per frame: for the frame lengths of speech front ends (400-512 samples) the
// table stays in shared memory and the direct sum is not the bottleneck.
//
// Two entry points share the kernel:
//   * trtq_stft_kernel: the __global__ function itself, extern "C" so its PTX name is fixed.
//     The TensorRT plugin's ahead-of-time implementation (stft_plugin.py) hands this PTX to
//     TensorRT, which launches it with the tensor inputs first, then the scalar arguments,
//     then the output, hence the parameter order.
//   * trtq_stft: a C function that checks its arguments and launches the kernel on a stream;
//     the plugin's just-in-time implementation and the tests call it through ctypes.
//
// Launch geometry (stft_kernel.py mirrors it for the plugin): grid (n_frames, batch),
// trtq_stft_block_size(N) threads, trtq_stft_shared_bytes(N) bytes of dynamic shared memory.

#include <cuda_runtime.h>

#include <stddef.h>

// Twiddles (float2) and the windowed frame (float): 12 bytes per sample must fit in the
// 48 KiB of shared memory every launch may use without opting in.
#define TRTQ_STFT_MAX_FRAME_LENGTH 4096
#define TRTQ_STFT_MAX_BLOCK 256
// gridDim.y limit.
#define TRTQ_STFT_MAX_BATCH 65535

extern "C" __global__ void trtq_stft_kernel(const float* __restrict__ signal,
                                            const float* __restrict__ window, int batch,
                                            int signal_length, int frame_length, int frame_step,
                                            int n_frames, float* __restrict__ out)
{
    const int frame = blockIdx.x;
    const int b = blockIdx.y;
    if (frame >= n_frames || b >= batch) {
        return;  // uniform across the block: no thread is left waiting at the barrier below
    }
    const int length = frame_length;

    extern __shared__ float2 shared[];
    float2* twiddle = shared;                                   // [N]: cos, sin of 2 pi m / N
    float* samples = reinterpret_cast<float*>(shared + length);  // [N]: windowed frame

    const float* x = signal + static_cast<size_t>(b) * signal_length
                     + static_cast<size_t>(frame) * frame_step;
    for (int n = threadIdx.x; n < length; n += blockDim.x) {
        const float w = window != nullptr ? window[n] : 1.0f;
        samples[n] = x[n] * w;
        float s, c;
        sincospif(2.0f * static_cast<float>(n) / static_cast<float>(length), &s, &c);
        twiddle[n] = make_float2(c, s);
    }
    __syncthreads();

    const int bins = length / 2 + 1;
    float* y = out + (static_cast<size_t>(b) * n_frames + frame) * bins * 2;
    for (int k = threadIdx.x; k < bins; k += blockDim.x) {
        float re = 0.0f;
        float im = 0.0f;
        int m = 0;  // k * n mod N
        for (int n = 0; n < length; ++n) {
            const float2 t = twiddle[m];
            const float v = samples[n];
            re = fmaf(v, t.x, re);
            im = fmaf(-v, t.y, im);
            m += k;
            if (m >= length) {
                m -= length;
            }
        }
        y[2 * k] = re;
        y[2 * k + 1] = im;
    }
}

extern "C" {

int trtq_stft_frames(int signal_length, int frame_length, int frame_step)
{
    if (frame_length < 1 || frame_step < 1 || signal_length < frame_length) {
        return 0;
    }
    return 1 + (signal_length - frame_length) / frame_step;
}

int trtq_stft_block_size(int frame_length)
{
    const int bins = frame_length / 2 + 1;
    const int warps = (bins + 31) / 32;
    const int threads = warps * 32;
    return threads < TRTQ_STFT_MAX_BLOCK ? threads : TRTQ_STFT_MAX_BLOCK;
}

int trtq_stft_shared_bytes(int frame_length)
{
    return frame_length * static_cast<int>(sizeof(float2) + sizeof(float));
}

int trtq_stft_max_frame_length(void) { return TRTQ_STFT_MAX_FRAME_LENGTH; }

const char* trtq_stft_error_string(int code)
{
    return cudaGetErrorString(static_cast<cudaError_t>(code));
}

// 0 on success, else a cudaError_t: cudaErrorInvalidValue for arguments the kernel cannot
// take, or the launch error.
int trtq_stft(const float* signal, const float* window, float* out, int batch, int signal_length,
              int frame_length, int frame_step, cudaStream_t stream)
{
    if (signal == nullptr || out == nullptr || batch < 1 || batch > TRTQ_STFT_MAX_BATCH
        || frame_length < 1 || frame_length > TRTQ_STFT_MAX_FRAME_LENGTH || frame_step < 1
        || signal_length < frame_length) {
        return static_cast<int>(cudaErrorInvalidValue);
    }
    const int n_frames = trtq_stft_frames(signal_length, frame_length, frame_step);
    const dim3 grid(static_cast<unsigned>(n_frames), static_cast<unsigned>(batch));
    trtq_stft_kernel<<<grid, trtq_stft_block_size(frame_length),
                       trtq_stft_shared_bytes(frame_length), stream>>>(
        signal, window, batch, signal_length, frame_length, frame_step, n_frames, out);
    return static_cast<int>(cudaGetLastError());
}

}  // extern "C"
