"""Base layer: what every stage uses, and nothing stage-specific.

Takes nothing from the stages above it. Gives run directories (`runs`: naming, claiming, the
record as a run starts), what a run directory holds and its typed readers (`rundir`), run.json as
a `RunRecord` (`record`), the split (`samples`) and what a run measured (`results`) as their files
hold them, the registry helper, the torch device, progress, the disk cache, distributed training,
checkpoints, ONNX metadata of exported files and onnxruntime sessions (`sessions`).
"""
