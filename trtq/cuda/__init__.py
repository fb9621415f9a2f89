"""CUDA helpers: device contexts and batch streaming (pycuda, imported lazily), and the
driver's own account of its version and GPUs (libcuda through ctypes, :mod:`.driver`)."""
