"""The inference core: what the container ships and `process.py` imports.

Image in, mask out: I/O and geometry, the plan, preprocessing and its inverse, the sliding window,
the ONNX engine and post-processing. numpy, SimpleITK, scipy, tqdm and onnxruntime only; never
torch, never matplotlib, never anything from `training/` or the tools beside this package.
"""
