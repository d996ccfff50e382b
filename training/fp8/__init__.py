"""FP8 primitives (formats, scaling, quantise/dequantise, FP8 linear), shared by training and serving."""
