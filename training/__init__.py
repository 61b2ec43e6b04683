"""Offline training for pantherseg: dataset ingest, planning, cross-validated 3D U-Nets,
post-processing selection, and ONNX export with the plan that inference reads.

Built on PyTorch and MONAI; preprocessing comes from `pantherseg.inference.preprocess`, never a
copy.
"""
