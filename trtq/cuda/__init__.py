"""CUDA helpers (pycuda, imported lazily): device contexts and batch streaming."""
