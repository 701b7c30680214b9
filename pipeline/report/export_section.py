"""The "Export and verification" section of report.html, from what `zoo export` and `zoo verify`
leave in a run: export.json, verification.json, and the gate's verify.json of a refused export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.core.rundir import RunDir, read_json
from pipeline.report.page import esc, fmt, key_values, percent, table, verdict, warning

GATE_REPORT = "verify.json"  # the export gate's own report, beside the exported file


def verification_section(run_dir: Path) -> str:
    """The last export and verification of the run, or how to make them."""
    run = RunDir(run_dir)
    export = run.exported()
    checked = run.verified()
    body = ""
    gate = _failed_gate(run, export)
    if gate:
        body += gate
    if export:
        body += _export_block(export)
    if checked:
        body += _verify_block(checked)
    if not body:
        body = warning(
            "Not exported yet: <code>zoo export RUN</code> writes model.onnx once onnxruntime "
            "matches PyTorch on the held-out images, and this page shows the result."
        )
    return body


def _failed_gate(run: RunDir, export: dict[str, Any] | None) -> str:
    """The gate's report of an export that was refused after the last successful one, if any."""
    path = run.path / GATE_REPORT
    report = read_json(path)
    if not report or report.get("written", True):
        return ""
    if export and run.export_file.stat().st_mtime >= path.stat().st_mtime:
        return ""
    failures = "".join(
        f"<li>{esc(f)}</li>" for r in report.get("results", []) for f in r.get("failures", [])
    )
    return (
        f"<h3>Last export: {verdict(False)}</h3><p>The exported ONNX did not match the PyTorch model, "
        f"so it was not written.</p><ul>{failures}</ul>"
    )


def _provider_rows(report: dict[str, Any]) -> str:
    rows, classes = [], []
    for r in report.get("results", []):
        acc = (
            "–"
            if r.get("accuracy_onnx") is None
            else f"{percent(r['accuracy_onnx'])} / {percent(r['accuracy_torch'])}"
        )
        rows.append(
            (
                esc(str(r.get("provider", "")).replace("ExecutionProvider", "")),
                fmt(r.get("n_inputs")),
                f"{r.get('max_abs', float('nan')):.3g}",
                percent(r.get("top1_agreement")),
                percent(r.get("top5_agreement")),
                acc,
                "pass" if r.get("passed") else "FAIL",
            )
        )
        classes.append("" if r.get("passed") else "fail")
    headers = [
        "provider",
        "inputs",
        "max |diff|",
        "top-1 agreement",
        "top-5 agreement",
        "accuracy onnx / torch",
        "verdict",
    ]
    return table(headers, rows, numeric=(1, 2, 3, 4, 5), row_classes=classes, raw=True)


def _export_block(export: dict[str, Any]) -> str:
    report = export.get("verify")
    state = (
        verdict(bool(report and report.get("passed"))) if export.get("verified") else "not verified"
    )
    body = f"<h3>Export: {state}</h3>" + key_values(
        {
            "file": export.get("path"),
            "size": f"{export.get('size', 0) / 1e6:.2f} MB",
            "opset": export.get("opset"),
            "exported": export.get("exported"),
        }
    )
    if report:
        body += f"<p>onnxruntime against PyTorch (atol {esc(report.get('atol'))}, rtol {esc(report.get('rtol'))}):</p>"
        body += _provider_rows(report)
    elif not export.get("verified"):
        body += warning("Exported with --no-verify: the file was not compared with PyTorch.")
    body += _targets_block(export.get("targets") or [])
    int8 = export.get("int8")
    if int8:
        body += "<h3>INT8 copy</h3>" + key_values(
            {
                "file": int8.get("path"),
                "size": f"{int8.get('size', 0) / 1e6:.2f} MB ({percent(int8.get('ratio'))} of fp32)",
                "accuracy int8 / fp32": f"{int8.get('accuracy_int8')} / {int8.get('accuracy_fp32')}",
                "top-1 agreement": int8.get("top1_agreement"),
            }
        )
    notes = export.get("notes") or []
    if notes:
        body += "<ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>"
    return body


def _targets_block(targets: list[dict[str, Any]]) -> str:
    """One row per deployment target of `zoo export --target`: its gate figures and its folder."""
    if not targets:
        return ""
    rows, classes = [], []
    for t in targets:
        written = t.get("path") if t.get("passed") else None
        own_sizes = t.get("resize_agreement")
        rows.append(
            (
                esc(t.get("target")),
                "pass" if t.get("passed") else ("not written" if t.get("skipped") else "FAIL"),
                percent(t.get("top1_agreement")) if not t.get("skipped") else "–",
                f"{t['max_prob_diff']:.2e}" if not t.get("skipped") else "–",
                "–" if own_sizes is None else percent(own_sizes),
                f"{t.get('size', 0) / 1e6:.2f} MB" if written else "–",
                f"{t.get('convert_seconds', 0):.1f} s" if t.get("convert_seconds") else "–",
                esc(written or t.get("skipped") or "; ".join(t.get("disagreeing") or [])),
            )
        )
        classes.append("" if t.get("passed") else "fail")
    headers = ["target", "verdict", "top-1 agreement", "max |prob diff|", "at own sizes", "size", "conversion", "folder, or why not"]  # fmt: skip
    intro = (
        "<p>Each target converted from the ONNX file by its own tool and run in its own runtime "
        "on the held-out images against PyTorch; written only when top-1 agreement is at least "
        "99.5% and probabilities differ by at most 1e-3 (files with the preprocessing inside: "
        "also 99% top-1 agreement on the images at their own sizes).</p>"
    )
    return "<h3>Deployment targets</h3>" + intro + table(headers, rows, numeric=(2, 3, 4, 5, 6), row_classes=classes, raw=True)  # fmt: skip


def _verify_block(checked: dict[str, Any]) -> str:
    body = f"<h3><code>zoo verify</code>: {verdict(bool(checked.get('passed')))}</h3>"
    body += key_values({"file": checked.get("path"), "checked": checked.get("checked")})
    if checked.get("torch"):
        body += _provider_rows(checked["torch"])
    runtimes = checked.get("runtimes") or {}
    if runtimes:
        rows = [
            (
                esc(name),
                "pass" if r.get("passed") else "FAIL",
                percent(r.get("top1_agreement")),
                esc(r.get("error") or ""),
            )
            for name, r in runtimes.items()
        ]
        body += table(["runtime", "verdict", "top-1 agreement", "error"], rows, raw=True)
    problems = checked.get("problems") or []
    if problems:
        body += "<ul>" + "".join(f"<li>{esc(p)}</li>" for p in problems) + "</ul>"
    return body
