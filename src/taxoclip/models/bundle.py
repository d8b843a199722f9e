"""A trained model as a directory, and `load` to open it for classification.

config.json               towers by name, the LiT shape, caption style, training settings
model.safetensors         text tower, projections, image centring, temperature
image_tower.safetensors   only when the image tower was trained too
classes.csv               the class table (index order)
captions.json             every class's captions in every style, and the caption configuration
class_embeddings.npy      the classifier: each class's caption embedding (evaluation style)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from taxoclip.errors import TaxoclipError
from taxoclip.models.lit import LiTConfig, LiTModel
from taxoclip.taxonomy import ClassTable

BUNDLE_VERSION = 1


def save_bundle(out: Path, model: LiTModel, cache, eval_style: str, *, training: dict, image_tower=None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    captions = cache.meta["captions"]
    by_class = captions["by_class"]
    class_embeddings = model.encode_captions([entry[eval_style] for entry in by_class]).cpu().numpy()
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    if image_tower is not None:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in image_tower.state_dict().items()},
            str(out / "image_tower.safetensors"),
        )
    ClassTable.from_json(cache.meta["classes"]).to_csv(out / "classes.csv")
    (out / "captions.json").write_text(json.dumps(captions, indent=1, ensure_ascii=False))
    np.save(out / "class_embeddings.npy", class_embeddings.astype(np.float32))
    config = {
        "version": BUNDLE_VERSION,
        "kind": "lit",
        "lit": model.config.to_json(),
        "eval_style": eval_style,
        "image_tower": cache.meta["tower"],
        "training": training,
    }
    (out / "config.json").write_text(json.dumps(config, indent=1))


class SpeciesModel:
    """A trained model ready to classify: image embeddings in, class probabilities out."""

    def __init__(self, path: Path, config: dict, model: LiTModel, classes: ClassTable, class_embeddings: torch.Tensor):
        self.path, self.config, self.model, self.classes = path, config, model, classes
        self.class_embeddings = class_embeddings
        self._image_tower = None

    @property
    def image_tower(self):
        if self._image_tower is None:
            from taxoclip.models.towers import create_image_tower

            lit = self.config["lit"]
            tower = create_image_tower(lit["image_tower"], pretrained=lit.get("image_pretrained", True))
            trained = self.path / "image_tower.safetensors"
            if trained.exists():
                tower.load_state_dict(load_file(str(trained)))
            self._image_tower = tower.for_inference(torch.device("cpu"))
        return self._image_tower

    @torch.no_grad()
    def logits_from_features(self, features: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Scaled similarities (N, classes) of image-tower features to every class."""
        image = self.model.encode_image_features(torch.as_tensor(np.asarray(features, np.float32)))
        return self.model.scale() * image @ self.class_embeddings.T

    def probabilities_from_features(self, features) -> torch.Tensor:
        return self.logits_from_features(features).softmax(-1)

    @torch.no_grad()
    def classify_images(self, images: list) -> torch.Tensor:
        """Class probabilities for PIL images."""
        tower = self.image_tower
        pixels = torch.stack([tower.preprocess.to_uint8(image) for image in images])
        return self.probabilities_from_features(tower.embed(pixels))

    def predict(self, images, *, top_k: int = 5, rank: str | None = None, subset=None, threshold: float | None = None):
        """Predictions for PIL images or photo paths: top-k species with lineage, the answer at
        ``rank``, restricted to ``subset`` taxa, and the deepest confident rank."""
        from taxoclip.inference.predict import DEFAULT_THRESHOLD, torch_predictor

        predictor = torch_predictor(
            self, subset=subset, threshold=DEFAULT_THRESHOLD if threshold is None else threshold
        )
        images = list(images)
        if images and isinstance(images[0], str | Path):
            return predictor.predict_paths(images, top_k=top_k, rank=rank)
        return predictor.predict_images(images, top_k=top_k, rank=rank)

    def image_embeddings(self, features) -> torch.Tensor:
        with torch.no_grad():
            return self.model.encode_image_features(torch.as_tensor(np.asarray(features, np.float32)))

    @property
    def scale(self) -> float:
        return float(self.model.scale().detach())

    @property
    def image_tower_name(self) -> str:
        return self.config["lit"]["image_tower"]

    @property
    def image_pretrained(self) -> bool:
        return self.config["lit"].get("image_pretrained", True)

    def use_style(self, style: str) -> None:
        """Classify with another caption style, or ``templates`` (a CLIP-style prompt ensemble);
        the class embeddings are cached in the model directory."""
        from taxoclip.eval.zeroshot import caption_sets, class_embeddings_cached
        from taxoclip.models.towers import fingerprint

        by_class = json.loads((self.path / "captions.json").read_text())["by_class"]
        sets = caption_sets(by_class, self.classes, style)
        tag = f"lit|{fingerprint(self.model)}"  # a retrained model in the same folder gets new embeddings
        self.class_embeddings = class_embeddings_cached(self.model.encode_captions, sets, self.path, tag=tag)


def load(path: str | Path) -> SpeciesModel:
    """Open a model directory written by ``taxoclip train``."""
    from taxoclip.models.towers import create_text_tower

    path = Path(path)
    config_path = path / "config.json"
    if not config_path.exists():
        raise TaxoclipError(f"{path}: not a taxoclip model (no config.json); train one with 'taxoclip train lit'")
    config = json.loads(config_path.read_text())
    lit_config = LiTConfig(**config["lit"])
    text_tower = create_text_tower(lit_config.text_tower, pretrained=False)  # weights come from the bundle
    model = LiTModel(lit_config, text_tower)
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    model.eval()
    classes = ClassTable.from_csv(path / "classes.csv")
    class_embeddings = torch.from_numpy(np.load(path / "class_embeddings.npy"))
    return SpeciesModel(path, config, model, classes, class_embeddings)
