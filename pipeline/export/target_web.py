"""The `web` target: a static folder where a person picks or drops images and sees the top-3 labels.

    RUN/deploy/web/index.html           the page (no remote script, font or CDN)
                   model.onnx           uint8 pixels [1, H, W, C] of any size -> probabilities
                   ort.wasm.min.js, ort-wasm-simd-threaded.{wasm,mjs}    onnxruntime-web
                   labels.txt, preprocess.json, README.md

The runtime files come from `pipeline/export/web/node_modules`, installed offline-reproducibly
by `make` (`npm ci` on the pinned package-lock.json). The gate runs the same onnxruntime-web
WebAssembly build in node (`web/run_ort_web.mjs`), one image at a time as the page does.
"""

from __future__ import annotations

import html
import json
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.core.metadata import read_metadata
from pipeline.export.targets import (
    DeployTarget,
    TargetInput,
    as_batches,
    ood_readme,
    probs_of,
    register_target,
    write_companions,
)
from zoo.errors import UnsupportedModel, ZooError

WEB_DIR = Path(__file__).resolve().parent / "web"  # package.json, the runner, the page
RUNTIME_DIR = WEB_DIR / "node_modules" / "onnxruntime-web"
RUNTIME_FILES = ("ort.wasm.min.js", "ort-wasm-simd-threaded.wasm", "ort-wasm-simd-threaded.mjs")
RUNNER = WEB_DIR / "run_ort_web.mjs"
PAGE = WEB_DIR / "index.html"
TITLE_MARK = "__ZOO_TITLE__"
MODEL_FILE = "model.onnx"
HOW_TO_GET = "run `make` (it runs npm ci in pipeline/export/web; needs node and npm)"
NODE_SECONDS = 120.0  # starting node, loading the wasm and the model
SECONDS_PER_INPUT = 10.0  # one image in the wasm kernels, single-threaded, with margin


def pinned_version() -> str:
    """The onnxruntime-web version package.json pins."""
    return json.loads((WEB_DIR / "package.json").read_text())["dependencies"]["onnxruntime-web"]


def web_missing() -> str | None:
    """None when node and the pinned onnxruntime-web are installed, else what is missing."""
    if shutil.which("node") is None:
        return "node is not on PATH (apt-get install nodejs npm)"
    installed = RUNTIME_DIR / "package.json"
    if not installed.is_file():
        return f"onnxruntime-web is not installed in {WEB_DIR}/node_modules"
    version = json.loads(installed.read_text()).get("version")
    if version != pinned_version():
        return f"{WEB_DIR}/node_modules holds onnxruntime-web {version}, not the pinned {pinned_version()}"  # fmt: skip
    absent = [name for name in RUNTIME_FILES if not (RUNTIME_DIR / "dist" / name).is_file()]
    if absent:
        return f"onnxruntime-web in {WEB_DIR}/node_modules lacks {', '.join(absent)}"
    return None


def serve_command(folder: Path) -> str:
    """How to open the page: browsers refuse WebAssembly from file://."""
    return f"serve it with `python -m http.server -d {folder}`, then open http://localhost:8000/"


def page_title(onnx_path: Path) -> str:
    """The run's name from the file's metadata, else the file's own name."""
    metadata = read_metadata(onnx_path)
    return str(metadata.extra.get("run") or metadata.source.get("name") or onnx_path.stem)


def convert_web(source: TargetInput, folder: Path) -> Path:
    """Write the page, the model, the runtime files, labels, preprocessing and README into `folder`."""
    if not source.embedded:
        raise UnsupportedModel(
            "web: the page feeds decoded pixels, so its model needs the preprocessing inside; "
            "export with --embed-preprocess (the default for web)"
        )
    missing = web_missing()
    if missing:
        raise ZooError(f"web: {missing}; {HOW_TO_GET}")
    model = folder / MODEL_FILE
    shutil.copyfile(source.onnx_path, model)
    for name in RUNTIME_FILES:
        shutil.copyfile(RUNTIME_DIR / "dist" / name, folder / name)
    title = html.escape(page_title(source.onnx_path))
    (folder / "index.html").write_text(PAGE.read_text().replace(TITLE_MARK, title))
    write_companions(folder, source)
    (folder / "README.md").write_text(readme(source, title=page_title(source.onnx_path)))
    return model


def readme(source: TargetInput, *, title: str) -> str:
    """The folder's README.md: how to serve it and how to call the model from JavaScript."""
    channels = source.preprocess.channels
    order = "RGB" if channels == 3 else "one channel (ITU-R 601 luma, as Pillow's convert('L'))"
    return f"""# {title}: in the browser with onnxruntime-web

Written by `zoo export --target web`; it agreed with the PyTorch model on the run's held-out
images, run by onnxruntime-web {pinned_version()} (WebAssembly) itself.

## Open the page
Browsers refuse WebAssembly from `file://`, so serve this folder over HTTP:

    python -m http.server -d .        # from this folder; then open http://localhost:8000/

Pick or drop images; each gets its top-3 labels with their confidence. Nothing leaves the browser.

## The model
- `model.onnx` takes **uint8** pixels, **NHWC** `[1, H, W, {channels}]`, {order}, at **any size**:
  the resize (antialiased, as Pillow's), centre crop and normalisation are inside the graph.
- Its **first output is the probabilities** `[1, {len(source.labels)}]`, in the order of `labels.txt`.
{ood_readme(source)}- `preprocess.json`: what the graph does (resize {source.preprocess.resize}, crop {source.preprocess.crop}).

```js
// <script src="ort.wasm.min.js"></script> (ort-wasm-simd-threaded.wasm/.mjs beside it)
ort.env.wasm.numThreads = 1;
const session = await ort.InferenceSession.create('model.onnx');
const labels = (await (await fetch('labels.txt')).text()).trim().split('\\n');
// canvas: the image at its natural size, drawn on white from createImageBitmap(file,
// {{ colorSpaceConversion: 'none' }}) as index.html does, so the model sees what zoo predict sees.
const rgba = canvas.getContext('2d').getImageData(0, 0, width, height).data;
{_pixels_js(channels)}
const probs = (await session.run({{ [session.inputNames[0]]: input }}))[session.outputNames[0]].data;
const best = probs.indexOf(Math.max(...probs));
console.log(labels[best], probs[best]);
```
"""


def _pixels_js(channels: int) -> str:
    """JavaScript that turns canvas RGBA into the model's uint8 NHWC pixels."""
    if channels == 1:
        convert = "pixels[i / 4] = (rgba[i] * 19595 + rgba[i + 1] * 38470 + rgba[i + 2] * 7471 + 0x8000) >> 16;"  # fmt: skip
    else:
        convert = "pixels.set(rgba.subarray(i, i + 3), (i / 4) * 3);"
    return (
        f"const pixels = new Uint8Array(width * height * {channels});\n"
        f"for (let i = 0; i < rgba.length; i += 4) {convert}\n"
        f"const input = new ort.Tensor('uint8', pixels, [1, height, width, {channels}]);"
    )


def run_web(
    model: Path, inputs: np.ndarray | Sequence[np.ndarray], *, output: str = "probs"
) -> np.ndarray:
    """Probabilities [N, C] from onnxruntime-web's WebAssembly build, run by node, per image; or
    another output's values."""
    missing = web_missing()
    if missing:
        raise ZooError(f"web: {missing}; {HOW_TO_GET}")
    # Each image alone, as the page runs it; the runner reads uint8 and float32 .npy files.
    batches = [b if b.dtype == np.uint8 else b.astype(np.float32) for b in as_batches(inputs, 1)]
    with tempfile.TemporaryDirectory(prefix="zoo-web-") as tmp:
        folder = Path(tmp)
        paths = []
        for index, batch in enumerate(batches):
            paths.append(folder / f"{index}.npy")
            np.save(paths[-1], batch)
        (folder / "inputs.txt").write_text("".join(f"{p}\n" for p in paths))
        out = folder / "probs.bin"
        command = ["node", str(RUNNER), str(model), str(folder / "inputs.txt"), str(out), output]
        timeout = NODE_SECONDS + SECONDS_PER_INPUT * len(batches)
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise ZooError(f"web: onnxruntime-web in node took over {timeout:.0f} s on {len(batches)} inputs; run fewer images") from exc  # fmt: skip
        if done.returncode != 0:
            why = (done.stderr.strip().splitlines() or ["no message"])[-1][:300]
            raise ZooError(f"web: onnxruntime-web could not run {model.name} ({why}); check the file with `zoo verify`")  # fmt: skip
        values = np.fromfile(out, dtype=np.float32)
    rows = sum(len(b) for b in batches)
    named = json.loads(done.stdout.splitlines()[-1])["output"]
    if output != "probs":
        return values
    return probs_of(values.reshape(rows, -1), named_probs=named == "probs") if rows else values


WEB = register_target(
    DeployTarget(
        name="web",
        title="web page (onnxruntime-web)",
        extra=HOW_TO_GET,
        missing=web_missing,
        convert=convert_web,
        run=run_web,
        takes_any_size=True,
        embed_by_default=True,
        usage=serve_command,
    )
)
