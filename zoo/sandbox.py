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

from zoo.errors import InvalidModelFile, UnsupportedModel
from zoo.legacy import UnupgradableModel
from zoo.onnxfile import declared_opset

PROBE_TIMEOUT = 120.0  # seconds; a real classifier opens and runs once on zeros well within this
ORT_REFUSED = 3  # the child's exit code when onnxruntime raised an exception (no crash)
NOT_UPGRADABLE = 4  # the child's exit code when an opset-1..6 file cannot be upgraded

# The child's program. It prints the phase it enters, so the parent can say where it died.
CHILD_SCRIPT = """
import sys
import numpy as np
import onnxruntime as ort

TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64,
         "tensor(float16)": np.float16, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
         "tensor(uint8)": np.uint8, "tensor(int8)": np.int8, "tensor(bool)": np.bool_}
source = sys.argv[1]
if "--upgrade" in sys.argv[2:]:
    # onnx's version converter is C++ too: an old file is upgraded here, where a crash is harmless.
    print("upgrade", flush=True)
    import onnx
    from zoo.legacy import UnupgradableModel, upgrade_opset
    try:
        source = upgrade_opset(onnx.load(source)).model.SerializeToString()
    except Exception as exc:
        reason = exc.reason if isinstance(exc, UnupgradableModel) else f"{type(exc).__name__}: {exc}"
        print(reason.splitlines()[0][:300] if reason else "no reason given", file=sys.stderr, flush=True)
        sys.exit(4)
print("session", flush=True)
try:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
except Exception as exc:
    print(f"{type(exc).__name__}: {exc}".splitlines()[0][:300], file=sys.stderr, flush=True)
    sys.exit(3)
feeds = {}
for graph_input in session.get_inputs():
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in graph_input.shape]
    if graph_input.type not in TYPES or np.prod(shape) > 1 << 26:
        sys.exit(0)  # nothing sensible (or small enough) to feed; the session itself opened
    feeds[graph_input.name] = np.zeros(shape, dtype=TYPES[graph_input.type])
print("run", flush=True)
try:
    session.run(None, feeds)
except Exception:
    pass  # zeros of a guessed shape may be refused politely; only a crash matters here
"""


def _signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def probe_in_child(
    path: str | os.PathLike[str], *, upgrade: bool = False, timeout: float = PROBE_TIMEOUT
) -> None:
    """Open `path` with onnxruntime in a child process; refuse it if that fails, crashes or hangs.

    Every stage of the pipeline checks itself against onnxruntime, so a model it cannot open
    (an unknown operator, a broken graph) is refused now as InvalidModelFile; a crash or a hang
    is UnsupportedModel. With `upgrade` (an opset-1..6 file) the child first upgrades it as
    zoo.legacy does for every reader, and opens the upgraded copy; UnupgradableModel when it cannot.
    """
    path = Path(path)
    # The child imports zoo.legacy from this very tree, installed or not.
    package_root = str(Path(__file__).resolve().parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
    }
    try:
        child = subprocess.run(
            [sys.executable, "-c", CHILD_SCRIPT, str(path), *(["--upgrade"] if upgrade else [])],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    except subprocess.TimeoutExpired as exc:
        raise UnsupportedModel(
            f"{path.name}: onnxruntime did not finish opening and running it in {timeout:.0f} s; "
            "it was refused, get the model from a trusted source"
        ) from exc
    if child.returncode == 0:
        return
    if child.returncode == NOT_UPGRADABLE:
        lines = child.stderr.strip().splitlines()
        reason = lines[-1] if lines else "no reason given"
        raise UnupgradableModel(declared_opset(path) or 0, reason)
    if child.returncode == ORT_REFUSED:
        lines = child.stderr.strip().splitlines()
        reason = lines[-1] if lines else "no reason given"
        raise InvalidModelFile(
            f"{path.name}: onnxruntime cannot open it ({reason}); the file is damaged or uses "
            "what onnxruntime does not support, get it again or pick another model"
        )
    phases = child.stdout.split()
    phase = {"run": "running it", "upgrade": "upgrading its opset"}.get(
        phases[-1] if phases else "", "creating a session"
    )
    how = (
        f"killed by {_signal_name(child.returncode)}"
        if child.returncode < 0
        else f"exit code {child.returncode}"
    )
    raise UnsupportedModel(
        f"{path.name}: this model crashes onnxruntime ({how} while {phase}, in a separate "
        "process); it was refused, get the model from a trusted source or report it"
    )
