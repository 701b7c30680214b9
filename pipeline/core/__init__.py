"""Base layer: what every stage uses, and nothing stage-specific.

Takes nothing from the stages above it. Gives run directories and the run record (`runs`), the
registry helper, the torch device, progress, the disk cache, distributed training, checkpoints,
ONNX metadata of exported files and onnxruntime sessions (`sessions`).
"""
