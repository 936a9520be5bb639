"""Layer 6, quantization: fast QuantLinear conversion, calibration, distributed and layer-by-layer
runs, the streaming export, the quantize pipeline and the quality evaluation.
"""
