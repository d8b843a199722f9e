"""ONNX export: the image tower with the classification head (centring, projection, class
embeddings, temperature) as one graph from uint8-valued pixels to class probabilities.

The graph takes float pixels in 0..255, already resized and centre-cropped as the model's
preprocessing says (saved beside it as JSON), and does the normalisation itself, so any runtime
only has to resize and crop.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from taxoclip.errors import TaxoclipError
from taxoclip.models.towers import Preprocess


class ClassifierGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        tower = model.image_tower
        self.tower = tower.model.eval()
        self.head = model.model  # the LiT model: image centring/projection and temperature
        self.register_buffer("class_embeddings", model.class_embeddings.clone().float())
        self.register_buffer("mean", torch.tensor(tower.preprocess.mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(tower.preprocess.std).view(1, 3, 1, 1) * 255)
        self.scale = float(model.model.scale().detach())

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self.tower((pixels - self.mean) / self.std)
        image = self.head.encode_image_features(features)
        return (self.scale * image @ self.class_embeddings.T).softmax(-1)


def export_onnx(model_dir: str | Path, output: str | Path, *, opset: int = 18) -> Path:
    """Write ``output`` (.onnx) and ``output.json`` (preprocessing, class ids, model directory)."""
    import taxoclip

    model = taxoclip.load(model_dir)
    graph = ClassifierGraph(model).eval()
    size = model.image_tower.preprocess.size
    example = torch.randint(0, 255, (2, 3, size, size)).float()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    # The exporter reports progress on stdout; keep stdout for results (JSON, CSV).
    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
        torch.onnx.export(
            graph,
            (example,),
            str(output),
            input_names=["pixels"],
            output_names=["probabilities"],
            dynamic_shapes={"pixels": {0: torch.export.Dim("batch", min=1, max=4096)}},
            opset_version=opset,
            dynamo=True,
            external_data=False,
        )
    sidecar = {
        "model_dir": str(Path(model_dir).resolve()),
        "preprocess": asdict(model.image_tower.preprocess),
        "classes": model.classes.ids,
        "input": "float32 pixels 0-255, (N, 3, H, W), resized and cropped",
    }
    Path(str(output) + ".json").write_text(json.dumps(sidecar, indent=1))
    return output


class OnnxClassifier:
    """Class probabilities from an exported ONNX file, with onnxruntime on the CPU."""

    def __init__(self, path: str | Path):
        try:
            import onnxruntime
        except ImportError:
            raise TaxoclipError("running an ONNX model needs onnxruntime: pip install onnxruntime") from None
        path = Path(path)
        if not path.exists():
            raise TaxoclipError(f"{path}: no such ONNX file; make one with 'taxoclip export onnx'")
        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        sidecar = Path(str(path) + ".json")
        self.meta = json.loads(sidecar.read_text()) if sidecar.exists() else {}
        self.preprocess = Preprocess(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in self.meta.get("preprocess", {}).items()}
        )

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        (probabilities,) = self.session.run(None, {"pixels": pixels.float().numpy().astype(np.float32)})
        return torch.from_numpy(probabilities)
