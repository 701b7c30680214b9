"""The pipeline: one folder per stage, in the order data flows.

    core/     the base layer every stage uses: run directories and the run record, the registry
              helper, device, progress, the disk cache, distributed training, checkpoints, ONNX
              metadata, onnxruntime sessions
    convert/  ONNX file -> normalised graph -> trainable torch module (import, probe)
    surgery/  the adapted model: a new head for N classes, the freeze plan, inspect
    data/     sources (folders, CSV, built-in sets), images and decoding, splits
    train/    the loop, the cached fast path, the feature cache, the solver, strategies, auto, rank
    export/   the ONNX file back, quantization, the verification gate, runtimes, deployment
    report/   metrics, plots, predictions, the HTML page, comparison, evaluation of a file

`adapt`, `compare` and `check` conduct the stages; `zoo.api` sits on top. A stage imports only itself and
earlier stages (tests/test_imports.py).
"""
