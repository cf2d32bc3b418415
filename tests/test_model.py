import json

import numpy as np
import pytest
import torch

from vlm_assets.model import (CHARTCLIP_S, CHARTCLIP_S_HYBRID, DEFAULT_MODEL, ModelSpec, create, load_checkpoint,
                               resolve_device, save_checkpoint)
from vlm_assets.rendering import render_png
from vlm_assets.text_encoder import MiniLMEncoder


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return create(ModelSpec(), device="cpu")


@pytest.fixture(scope="module")
def chart_png():
    rng = np.random.default_rng(0)
    import pandas as pd

    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, 80)))
    open_ = np.r_[100, close[:-1]]
    bars = pd.DataFrame({"open": open_, "high": np.maximum(open_, close) * 1.003, "low": np.minimum(open_, close) * 0.997,
                         "close": close, "volume": np.full(80, 1e4)})
    return render_png(bars)


@pytest.mark.parametrize("name", [CHARTCLIP_S, CHARTCLIP_S_HYBRID])
def test_chartclip_models_have_a_small_conv_embedded_vit_and_the_offline_minilm_text_tower(name, chart_png):
    from vlm_assets.image_tower import STEM_STAGES, TRUNK_STAGES

    clip = create(ModelSpec(name), device="cpu")
    trunk = clip.model.visual.trunk
    blocks, convolutions = {CHARTCLIP_S: (6, len(STEM_STAGES) + 1), CHARTCLIP_S_HYBRID: (2, 8)}[name]
    assert len(trunk.blocks) == blocks and trunk.embed_dim == 256 and trunk.patch_embed.grid_size == (7, 7)
    assert isinstance(trunk.patch_embed.proj[0], torch.nn.InstanceNorm2d)  # per-image standardization comes first
    layers = [m for m in trunk.patch_embed.proj if isinstance(m, torch.nn.Conv2d)]
    assert len(layers) == convolutions and [m.stride[0] for m in layers].count(2) == 5  # 224 px -> 7x7 tokens
    if name == CHARTCLIP_S_HYBRID:
        assert convolutions == sum(n for _, _, n in TRUNK_STAGES)
    with torch.no_grad():
        images = clip.encode_images([chart_png, chart_png])
        texts = clip.encode_texts(["a hammer after a decline", "no candlestick pattern"])
    assert images.shape == (2, 256) and texts.shape == (2, 256)
    assert torch.allclose(images.norm(dim=-1), torch.ones(2), atol=1e-5)
    # The text transformer carries all-MiniLM-L6-v2's pretrained weights, not a random init.
    reference = MiniLMEncoder().model.state_dict()
    ours = clip.model.text.transformer.state_dict()
    key = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(ours[key], reference[key])


def test_checkpoint_round_trip_gives_identical_outputs(clip, chart_png, tmp_path):
    path = save_checkpoint(clip, tmp_path / "model.safetensors", {"dataset_version": "v1-test", "metrics": {"f1": 0.5}})
    sidecar = json.loads((tmp_path / "model.safetensors.json").read_text())
    assert sidecar["spec"]["name"] == DEFAULT_MODEL and sidecar["dataset_version"] == "v1-test"
    loaded, meta = load_checkpoint(path, device="cpu")
    assert meta["metrics"] == {"f1": 0.5} and loaded.spec == clip.spec
    with torch.no_grad():
        assert torch.equal(loaded.encode_images([chart_png]), clip.encode_images([chart_png]))
        assert torch.equal(loaded.encode_texts(["doji"]), clip.encode_texts(["doji"]))
    assert not list(tmp_path.glob(".*tmp"))


def test_a_checkpoint_loads_as_the_model_it_was_saved_from_and_a_misfit_is_a_clear_error(chart_png, tmp_path):
    convstem = create(ModelSpec(CHARTCLIP_S), device="cpu", seed=3)  # not the default: the sidecar names it
    path = save_checkpoint(convstem, tmp_path / "model.safetensors")
    loaded, _ = load_checkpoint(path, device="cpu")
    assert loaded.spec.name == CHARTCLIP_S
    with torch.no_grad():
        assert torch.equal(loaded.encode_images([chart_png]), convstem.encode_images([chart_png]))
    # The same weights under the other tower's name (as a checkpoint from before an architecture change reads).
    sidecar = tmp_path / "model.safetensors.json"
    sidecar.write_text(sidecar.read_text().replace(f'"{CHARTCLIP_S}"', f'"{CHARTCLIP_S_HYBRID}"'))
    with pytest.raises(ValueError, match="weights do not fit ChartCLIP-S-hybrid as this version builds it"):
        load_checkpoint(path, device="cpu")


def test_any_open_clip_model_loads_from_a_local_checkpoint(tmp_path, chart_png):
    """The path users with hub access take (e.g. ViT-B-32 + 'openai'), exercised with a checkpoint saved here."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = open_clip.create_model("ViT-S-32", pretrained=None)
    file = tmp_path / "vit-s-32.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(file))
    clip = create(ModelSpec(name="ViT-S-32", pretrained=str(file)), device="cpu")
    for name, tensor in source.state_dict().items():
        assert torch.equal(clip.model.state_dict()[name], tensor), name
    with torch.no_grad():
        assert clip.encode_images([chart_png]).shape[0] == 1


def test_bad_model_requests_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'NoSuchModel'"):
        create(ModelSpec(name="NoSuchModel"), device="cpu")
    with pytest.raises(ValueError, match="neither a file nor a known tag"):
        create(ModelSpec(name="ViT-S-32", pretrained="no-such-tag"), device="cpu")
    with pytest.raises(FileNotFoundError, match="sidecar"):
        load_checkpoint(tmp_path / "missing.safetensors")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    assert resolve_device("auto") in ("cpu", "cuda")


@pytest.mark.parametrize("name", [CHARTCLIP_S, "ViT-S-32"])
def test_cutting_padding_changes_no_text_embedding(name):
    clip = create(ModelSpec(name), device="cpu")
    texts = ["hammer", "a candle with a small body near the top of the range and a long lower shadow after a decline"]
    with torch.no_grad():
        full = clip.model.encode_text(clip.tokenizer(texts), normalize=True)
        cut = clip.encode_texts(texts)
    if name == CHARTCLIP_S:  # the HF tower is cut; open_clip's own text transformer keeps its full context
        assert clip.tokenize(texts).shape[1] < clip.tokenizer(texts).shape[1]
    assert torch.allclose(cut, full, atol=1e-5)
