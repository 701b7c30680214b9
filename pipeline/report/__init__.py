"""Report stage: what a run measured, for people.

Takes a run directory (its record, metrics, history, predictions, export.json). Gives metrics and
plots (`metrics`), per-image predictions, the self-contained report.html (`html`), the comparison
page of several runs (`compare`) and the metrics of an ONNX file on a data source (`evaluate`).
"""
