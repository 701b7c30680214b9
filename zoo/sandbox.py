"""Opening an untrusted model in a child process first, so a crash in onnxruntime cannot take `zoo` down.

onnxruntime is C++: a hostile or broken graph can make it abort or segfault, which no `try`
can catch. A model that did not come from the catalog with a matching sha256 is therefore
opened once in a separate Python process (session creation and one run on zeros); if that
process dies from a signal, the model is refused with a one-line error instead.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from zoo.errors import UnsupportedModel

PROBE_TIMEOUT = 120.0  # seconds; a real classifier opens and runs once on zeros well within this
ORT_REFUSED = 3  # the child's exit code when onnxruntime raised a Python exception (no crash)

# The child's program. It prints the phase it enters, so the parent can say where it died.
CHILD_SCRIPT = """
import sys
import numpy as np
import onnxruntime as ort

TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64,
         "tensor(float16)": np.float16, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
         "tensor(uint8)": np.uint8, "tensor(int8)": np.int8, "tensor(bool)": np.bool_}
print("session", flush=True)
try:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
    feeds = {}
    for graph_input in session.get_inputs():
        if graph_input.type not in TYPES:
            sys.exit(0)  # nothing sensible to feed; the session itself opened
        shape = [d if isinstance(d, int) and 0 < d <= 4096 else 1 for d in graph_input.shape]
        feeds[graph_input.name] = np.zeros(shape, dtype=TYPES[graph_input.type])
    print("run", flush=True)
    session.run(None, feeds)
except Exception as exc:
    print(f"{type(exc).__name__}: {exc}".splitlines()[0][:300], file=sys.stderr, flush=True)
    sys.exit(3)
"""


def _signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def probe_in_child(path: str | os.PathLike[str], *, timeout: float = PROBE_TIMEOUT) -> None:
    """Open `path` with onnxruntime in a child process; refuse it if that process crashes or hangs.

    A Python-level refusal by onnxruntime (an unsupported operator, say) is not a crash: it is
    left to the pipeline, which reports it with its own message when the model is used.
    """
    path = Path(path)
    try:
        child = subprocess.run(
            [sys.executable, "-c", CHILD_SCRIPT, str(path)],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise UnsupportedModel(
            f"{path.name}: onnxruntime did not finish opening and running it in {timeout:.0f} s; "
            "it was refused, get the model from a trusted source"
        ) from exc
    if child.returncode in (0, ORT_REFUSED):
        return
    phases = child.stdout.split()
    phase = "running it" if phases[-1:] == ["run"] else "creating a session"
    how = (
        f"killed by {_signal_name(child.returncode)}"
        if child.returncode < 0
        else f"exit code {child.returncode}"
    )
    raise UnsupportedModel(
        f"{path.name}: this model crashes onnxruntime ({how} while {phase}, in a separate "
        "process); it was refused, get the model from a trusted source or report it"
    )
