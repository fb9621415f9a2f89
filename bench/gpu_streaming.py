"""GPU benchmark: feeding calibration batches to TensorRT, trtq's streamer vs synchronous copies.

TensorRT's calibrator asks for a batch, computes on it, then asks for the next.
polygraphy's calibrator copies each batch synchronously from pageable memory
when asked; trtq's :class:`~trtq.cuda.memory.BatchStreamer` copies the next
batch (pinned, asynchronous, on its own stream) while TensorRT computes on the
current one. TensorRT is not installed on the GPU machine, so its per-batch
work is stood in for by a kernel that runs for a fixed time (``--compute-ms``)
on the batch's device buffer. Both feeders run the same batches in the same
run; the ratio is what counts.

Run on a GPU machine (``scripts/gpu_check.sh``)::

    python bench/gpu_streaming.py --batches 32 --batch-mib 64 --compute-ms 5.0
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from trtq.fileio import write_json

SPIN_KERNEL = r"""
extern "C" __global__ void spin(const float *x, float *out, long long cycles)
{
    // Stands in for TensorRT's work on one batch: read the batch, then hold the SM.
    long long start = clock64();
    float acc = x[threadIdx.x];
    while (clock64() - start < cycles) { acc = acc * 0.999f + 1e-7f; }
    if (threadIdx.x == 0) out[0] = acc;
}
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--batches", type=int, default=32, help="batches per feeder")
    parser.add_argument("--batch-mib", type=float, default=64.0, help="size of one batch")
    parser.add_argument(
        "--compute-ms", type=float, default=5.0, help="stand-in for TensorRT's work per batch"
    )
    parser.add_argument("--json", help="also write the figures here")
    return parser.parse_args()


def make_batches(count: int, mib: float, lazy: bool):
    """Distinct pageable host batches: all in memory, or made one by one as a loader would.

    The lazy loader's work (one pass over the batch, like reading it from a file)
    is part of the feeding in both feeders: trtq overlaps it with compute.
    """
    elements = int(mib * (1 << 20)) // 4
    base = np.random.default_rng(0).standard_normal(elements).astype(np.float32)
    if not lazy:
        return [{"x": np.roll(base, i)} for i in range(count)]
    return ({"x": np.roll(base, i)} for i in range(count))


def synchronous_feed(cuda, batches, compute, nbytes: int) -> float:
    """polygraphy's way: allocate once, copy each batch synchronously from pageable memory."""
    device = cuda.mem_alloc(nbytes)
    cuda.Context.synchronize()
    start = time.perf_counter()
    for batch in batches:
        cuda.memcpy_htod(device, batch["x"])
        compute(int(device))
    cuda.Context.synchronize()
    elapsed = time.perf_counter() - start
    device.free()
    return elapsed


def streamed_feed(cuda, batches, compute) -> float:
    """trtq's way: pinned double buffers, the next batch in flight during compute."""
    from trtq.cuda.memory import BatchStreamer

    cuda.Context.synchronize()
    start = time.perf_counter()
    streamer = BatchStreamer(batches, cuda)
    while (pointers := streamer.next_pointers(["x"])) is not None:
        compute(pointers[0])
    cuda.Context.synchronize()
    elapsed = time.perf_counter() - start
    streamer.close()
    return elapsed


def main() -> int:
    args = parse_args()
    import pycuda.driver as cuda
    from pycuda.compiler import SourceModule

    cuda.init()
    device = cuda.Device(0)
    context = device.retain_primary_context()
    context.push()
    try:
        spin = SourceModule(SPIN_KERNEL).get_function("spin")
        clock_khz = device.get_attribute(cuda.device_attribute.CLOCK_RATE)
        cycles = np.int64(args.compute_ms * clock_khz)
        out = cuda.mem_alloc(4)
        stream = cuda.Stream()

        def compute(pointer: int) -> None:
            # TensorRT computes on its own stream and the calibrator waits for it.
            spin(np.intp(pointer), out, cycles, block=(32, 1, 1), grid=(1, 1), stream=stream)
            stream.synchronize()

        nbytes = int(args.batch_mib * (1 << 20)) // 4 * 4
        total_gb = nbytes * args.batches / 1e9
        compute_only = time_compute(cuda, compute, args.batches)
        warm = make_batches(2, args.batch_mib, lazy=False)
        streamed_feed(cuda, warm, compute)  # warm-up: allocations, module load
        synchronous_feed(cuda, warm, compute, nbytes)
        results = {
            "gpu": device.name(),
            "batches": args.batches,
            "batch_mib": args.batch_mib,
            "compute_ms": args.compute_ms,
            "compute_only_s": compute_only,
        }
        for lazy in (False, True):
            kind = "loaded" if lazy else "in_memory"
            batches = make_batches(args.batches, args.batch_mib, lazy)
            sync_s = synchronous_feed(cuda, batches, compute, nbytes)
            batches = make_batches(args.batches, args.batch_mib, lazy)
            stream_s = streamed_feed(cuda, batches, compute)
            results[kind] = {
                "synchronous_s": sync_s,
                "streamed_s": stream_s,
                "synchronous_gb_per_s": total_gb / sync_s,
                "streamed_gb_per_s": total_gb / stream_s,
                "streamed_over_synchronous_time": stream_s / sync_s,
            }
    finally:
        cuda.Context.pop()
    print_table(results)
    if args.json:
        write_json(args.json, results)
    return 0


def time_compute(cuda, compute, count: int) -> float:
    """The stand-in compute alone: the floor any feeder can reach."""
    scratch = cuda.mem_alloc(4096)
    cuda.Context.synchronize()
    start = time.perf_counter()
    for _ in range(count):
        compute(int(scratch))
    elapsed = time.perf_counter() - start
    scratch.free()
    return elapsed


def print_table(r: dict) -> None:
    print(f"GPU {r['gpu']}: {r['batches']} batches of {r['batch_mib']:g} MiB, "
          f"{r['compute_ms']:g} ms of stand-in compute per batch")  # fmt: skip
    print(f"  compute alone              {r['compute_only_s'] * 1e3:8.1f} ms")
    for kind, label in (("in_memory", "batches in memory"), ("loaded", "batches loaded lazily")):
        f = r[kind]
        print(f"  {label}:")
        print(f"    synchronous pageable     {f['synchronous_s'] * 1e3:8.1f} ms  "
              f"{f['synchronous_gb_per_s']:6.1f} GB/s")  # fmt: skip
        print(f"    trtq streamed (pinned)   {f['streamed_s'] * 1e3:8.1f} ms  "
              f"{f['streamed_gb_per_s']:6.1f} GB/s")  # fmt: skip
        print(f"    streamed / synchronous   {f['streamed_over_synchronous_time']:8.2f}x time")


if __name__ == "__main__":
    raise SystemExit(main())
