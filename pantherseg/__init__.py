"""pantherseg: pancreatic tumor segmentation on abdominal MRI (PANTHER challenge).

The core package stays free of torch so that the inference container remains small;
training lives in the separate `training` package.
"""

__version__ = "0.1.0"
