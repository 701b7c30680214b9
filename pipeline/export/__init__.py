"""Export stage: a trained run back to files that other runtimes deploy, each behind the gate.

Takes a run (its model, split and preprocessing). Gives the ONNX file with its metadata (`write`),
INT8 (`quantize`), the one oracle that compares runtimes with PyTorch (`verify`), the registry of
other runtimes (`runtimes`) and the commands' entry points (`deploy`: export, verify, predict).
"""
