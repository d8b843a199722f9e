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

from taxoclip.data.preprocess import Preprocess
from taxoclip.errors import TaxoclipError
from taxoclip.models.classifier import Classifier
from taxoclip.taxonomy import ClassTable


class ClassifierGraph(nn.Module):
    """0-255 pixels -> normalisation -> image tower -> the classifier's head -> probabilities (and,
    with a novelty detector, each photo's novelty score)."""

    def __init__(self, classifier: Classifier, novelty=None):
        super().__init__()
        tower = classifier.image_tower
        self.tower = tower.model.eval()
        self.head = classifier.head().eval()
        self.novelty = novelty
        self.register_buffer("mean", torch.tensor(tower.preprocess.mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(tower.preprocess.std).view(1, 3, 1, 1) * 255)

    def forward(self, pixels: torch.Tensor):
        features = self.tower((pixels - self.mean) / self.std)
        logits = self.head(features)
        if self.novelty is None:
            return logits.softmax(-1)
        return logits.softmax(-1), self.novelty.novelty(features, logits)


def export_onnx(model: str | Path, output: str | Path, *, opset: int = 18, open_set: str = "auto", **options) -> Path:
    """Write ``output`` (.onnx) and ``output.json`` (preprocessing, class table, the model it came
    from, the open-set rule). ``model`` is anything `load_classifier` opens (``options`` go to it);
    with an open-set score (``open_set``, see `open_set_for`) the graph outputs it too."""
    from taxoclip.models.novelty import open_set_for
    from taxoclip.models.registry import load_classifier

    classifier = load_classifier(model, **options)
    novelty = open_set_for(classifier, open_set)
    graph = ClassifierGraph(classifier, novelty).eval()
    size = classifier.image_tower.preprocess.size
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
            output_names=["probabilities", "novelty"] if novelty is not None else ["probabilities"],
            dynamic_shapes={"pixels": {0: torch.export.Dim("batch", min=1, max=4096)}},
            opset_version=opset,
            dynamo=True,
            external_data=False,
        )
    sidecar = {
        "model_dir": str(Path(model).resolve()) if Path(model).exists() else str(model),
        "preprocess": asdict(classifier.image_tower.preprocess),
        "classes": classifier.classes.ids,
        "class_table": classifier.classes.to_json(),
        "input": "float32 pixels 0-255, (N, 3, H, W), resized and cropped",
    }
    if novelty is not None:  # the "novelty" output's meaning: above the threshold, no known species
        from taxoclip.inference.predict import OpenSetRule

        sidecar["open_set"] = asdict(OpenSetRule.of(novelty, len(classifier.classes)))
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
        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own exception types for a damaged file
            raise TaxoclipError(
                f"{path}: not a readable ONNX model ({type(error).__name__}); export it again"
            ) from None
        shape = self.session.get_outputs()[0].shape
        self.n_classes = shape[-1] if shape and isinstance(shape[-1], int) else None  # None: a symbolic size
        sidecar = Path(str(path) + ".json")
        self.meta = json.loads(sidecar.read_text()) if sidecar.exists() else {}
        self.preprocess = Preprocess(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in self.meta.get("preprocess", {}).items()}
        )

    def classes(self) -> ClassTable | None:
        """The class table the sidecar carries (None for files exported before it did)."""
        table = self.meta.get("class_table")
        return ClassTable.from_json(table) if table else None

    def open_set_rule(self):
        """The open-set rule the file was exported with (None without a novelty output)."""
        from taxoclip.inference.predict import OpenSetRule

        rule = self.meta.get("open_set")
        if not rule or len(self.session.get_outputs()) < 2:
            return None
        return OpenSetRule.from_json(rule)

    def __call__(self, pixels: torch.Tensor):
        outputs = self.session.run(None, {"pixels": pixels.float().numpy().astype(np.float32)})
        if len(outputs) == 2 and self.open_set_rule() is not None:
            return torch.from_numpy(outputs[0]), torch.from_numpy(outputs[1])
        return torch.from_numpy(outputs[0])
