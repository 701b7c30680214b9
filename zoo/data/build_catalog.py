"""Regenerate zoo/data/catalog.json from the zoo survey (../shared/zoo-classifiers.json).

Run: python zoo/data/build_catalog.py PATH/TO/zoo-classifiers.json
The survey keeps preprocessing as prose; this turns it into the numbers `Preprocess` needs
and keeps the prose beside them so `zoo info` can show where each figure came from.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

# Short names users type; each points at the sensible default of its family.
ALIASES = {
    "mobilenet": "mobilenetv2-12",
    "mobilenetv2": "mobilenetv2-12",
    "resnet": "resnet50-v1-12",
    "resnet50": "resnet50-v1-12",
    "resnet18": "resnet18-v1-7",
    "resnet34": "resnet34-v1-7",
    "resnet101": "resnet101-v1-7",
    "resnet152": "resnet152-v1-7",
    "squeezenet": "squeezenet1.1-7",
    "efficientnet": "efficientnet-lite4-11",
    "efficientnet-lite4": "efficientnet-lite4-11",
    "shufflenet": "shufflenet-v2-12",
    "shufflenet-v2": "shufflenet-v2-12",
    "vgg": "vgg16-12",
    "vgg16": "vgg16-12",
    "vgg19": "vgg19-7",
    "alexnet": "bvlcalexnet-12",
    "caffenet": "caffenet-12",
    "googlenet": "googlenet-12",
    "inception": "inception-v1-12",
    "inception-v1": "inception-v1-12",
    "inception-v2": "inception-v2-9",
    "densenet": "densenet-12",
    "densenet121": "densenet-12",
    "zfnet": "zfnet512-12",
    "mnist": "mnist-12",
    "rcnn": "rcnn-ilsvrc13-9",
}

LICENCES = {"mnist": "MIT"}


def parse_preprocess(raw: dict, input_shape: list | None, layout: str) -> dict | None:
    if raw.get("mean") is None:
        return None
    resize_text = raw.get("resize") or ""
    crop_text = raw.get("crop") or ""
    channels = 1 if "grayscale" in resize_text else 3
    numbers = [int(n) for n in re.findall(r"\d+", resize_text.split(" (")[0])]
    if crop_text:
        crop = int(re.findall(r"\d+", crop_text)[0])
    elif input_shape:
        crop = input_shape[1] if layout == "NHWC" else input_shape[2]
    else:
        crop = numbers[-1]
    resize = numbers[-1] if numbers else crop
    return {
        "mean": raw["mean"],
        "std": raw["std"],
        "scale": raw["scale"] if raw.get("scale") is not None else 1 / 255,
        "bgr": bool(raw.get("bgr")),
        "resize": resize,
        "resize_mode": "shorter" if "shorter side" in resize_text else "direct",
        "crop": crop,
        "layout": layout,
        "channels": channels,
        "confidence": raw.get("confidence"),
        "note": f"resize: {resize_text}; crop: {crop_text or 'none'}",
    }


def convert(entry: dict) -> dict:
    layout = entry["input"].get("layout") or "NCHW"
    aliases = sorted(alias for alias, target in ALIASES.items() if target == entry["name"])
    output = entry["output"]
    shape = output.get("shape")
    if shape and len(shape) == 4:
        output_kind = "probabilities-4d" if output.get("softmax") else "logits-4d"
    else:
        output_kind = "probabilities" if output.get("softmax") else "logits"
    archive = entry.get("archive")
    return {
        "name": entry["name"],
        "family": entry["family"],
        "aliases": aliases,
        "path": entry["path"],
        "urls": entry["urls"],
        "sha256": entry["sha256"],
        "size": entry["size"],
        "opset": entry["opset"],
        "input": {
            "name": entry["input"].get("name"),
            "shape": entry["input"].get("shape"),
            "layout": layout,
        },
        # Name and shape: with the input's, what `zoo` recognises an older revision of the file by.
        "output": {"name": output.get("name"), "shape": shape},
        "output_kind": output_kind,
        "num_classes": (shape[1] if shape else (10 if entry["family"] == "mnist" else 1000)),
        "preprocess": parse_preprocess(entry["preprocess"], entry["input"].get("shape"), layout),
        "top1": entry.get("top1"),
        "licence": LICENCES.get(entry["family"], "Apache-2.0"),
        "fixed_batch": entry.get("fixed_batch"),
        "archive": (
            {k: archive[k] for k in ("path", "sha256", "size", "urls")} if archive else None
        ),
    }


def main(survey: Path) -> None:
    entries = [convert(e) for e in json.loads(survey.read_text())]
    entries.sort(key=lambda e: (e["family"], e["name"]))
    out = Path(__file__).with_name("catalog.json")
    out.write_text(json.dumps({"version": 1, "models": entries}, indent=1) + "\n")
    print(f"wrote {len(entries)} entries to {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/zoo-classifiers.json"))
