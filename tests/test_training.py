"""Training building blocks on real data and the real default model, ChartCLIP-S-hybrid (tiny market, a few steps)."""

import numpy as np
import pandas as pd
import pytest
import torch
from dagster import materialize

from vlm_assets import model as chart_model
from vlm_assets import training
from vlm_assets.dataset import ImageConfig, WindowSamplingConfig
from vlm_assets.definitions import DATA_ASSETS
from vlm_assets.labeling import CORE_PATTERNS
from vlm_assets.pipeline.artifacts import load_bars, load_labels, read_frame
from vlm_assets.storage import ArtifactStore
from tests.conftest import TINY_RUN_CONFIG, tiny_resources

TINY_SAMPLING = WindowSamplingConfig(min_bars=50, max_bars=60, block_days=5, timeframes=("1m", "5m", "15m"))


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("training-data")
    assert materialize(DATA_ASSETS, resources=tiny_resources(root), run_config=TINY_RUN_CONFIG).success
    return ArtifactStore(root)


@pytest.fixture(scope="module")
def windows(tiny_store):
    dataset = read_frame(tiny_store, "vlm_dataset", "windows.parquet", columns=["symbol", "block", "split"])
    return training.TrainingWindows(load_bars(tiny_store), load_labels(tiny_store), dataset, TINY_SAMPLING,
                                    ImageConfig(), training.StreamConfig())


def test_training_windows_come_only_from_train_blocks(tiny_store, windows):
    dataset = read_frame(tiny_store, "vlm_dataset", "windows.parquet", columns=["symbol", "block", "split"])
    held_out = set(map(tuple, dataset.loc[dataset["split"] != "train", ["symbol", "block"]].to_numpy()))
    used = set(map(tuple, windows.candidates[["symbol", "block"]].to_numpy()))
    assert used and not used & held_out


def test_plans_are_deterministic_and_render_labels_of_their_window(windows):
    first = windows.plan(np.random.default_rng(4), 16)
    assert first == windows.plan(np.random.default_rng(4), 16)
    sample = windows.render(first[0])
    assert sample["image"].size == (224, 224)
    row = windows.candidates.iloc[first[0].candidate]
    assert sample["labels"].tolist() == row[list(CORE_PATTERNS)].astype(float).tolist()
    assert sample["anatomy"].shape == (len(training.ANATOMY_TARGETS),)
    assert np.asarray(windows.render(first[0])["image"]).tobytes() == np.asarray(sample["image"]).tobytes()


def test_margin_targets_are_the_rule_margins_at_the_window_end(windows, tiny_store):
    labels = load_labels(tiny_store)
    candidates = np.arange(0, len(windows.candidates), max(1, len(windows.candidates) // 50))
    targets = windows.margin_targets(candidates, 0.3)
    for candidate, target in zip(candidates, targets):
        row = windows.candidates.iloc[candidate]
        frame = labels[(row["symbol"], row["timeframe"])]
        margins = frame[[f"{p}_margin" for p in CORE_PATTERNS]].to_numpy()[row["pos"]]
        expected = np.tanh(np.where(np.isfinite(margins), margins, -3.0) / 0.3)
        np.testing.assert_allclose(target, expected, atol=1e-6)
        fired = frame[list(CORE_PATTERNS)].to_numpy(bool)[row["pos"]]
        assert (target[fired] >= 0).all() and (target[~fired] <= 0).all()  # the sign is the label
    assert targets.dtype == np.float32 and np.abs(targets).max() <= 1.0


def test_finetune_config_refuses_negative_weights_and_scales():
    with pytest.raises(ValueError, match="margin_weight=-1"):
        training.FinetuneConfig(margin_weight=-1.0)
    with pytest.raises(ValueError, match="margin_scale"):
        training.FinetuneConfig(margin_scale=0.0)


def test_finetune_without_the_margin_term_logs_no_margin_loss(windows):
    clip = chart_model.create(device="cpu")
    optim = training.OptimConfig(steps=1, batch_size=6, warmup_steps=1, workers=0)
    result = training.finetune(clip, windows, training.FinetuneConfig(optim=optim),
                               {p: [p.replace("_", " ")] for p in CORE_PATTERNS})
    assert training.FinetuneConfig().margin_weight == 0.0  # the default (docs/model.md says why)
    assert "margins" not in result.history.columns and {"multilabel", "anatomy"} <= set(result.history.columns)


def test_anatomy_targets_measure_the_last_candles():
    bars = pd.DataFrame({"open": [10.0, 11.0, 12.0], "high": [11.5, 12.5, 12.2], "low": [9.5, 10.5, 10.0],
                         "close": [11.0, 12.0, 10.5]})
    targets = dict(zip(training.ANATOMY_TARGETS, training.anatomy_targets(bars, pd.Series({"avg_range": 2.0, "trend": 1.5}))))
    assert targets["c3_body"] == pytest.approx(0.75)  # |10.5 - 12| / 2
    assert targets["c3_upper"] == pytest.approx(0.1)  # (12.2 - 12) / 2
    assert targets["c3_lower"] == pytest.approx(0.25)  # (10.5 - 10) / 2
    assert targets["c3_direction"] == -1 and targets["c2_direction"] == 1
    assert targets["trend"] == pytest.approx(0.5)
    assert targets["outside"] == 0 and targets["inside"] == 0


def test_hard_negative_buffer_keeps_the_hardest():
    buffer = training.HardNegativeBuffer(capacity=3)
    buffer.add(np.array([1, 2, 3, 4]), np.array([0.9, 0.1, 0.5, 0.7]))
    assert sorted(buffer.hardness) == [1, 3, 4]
    buffer.add(np.array([3]), np.array([0.95]))
    assert buffer.hardness[3] == pytest.approx(0.95)
    picks = buffer.sample(np.random.default_rng(0), 10)
    assert set(picks) <= {1, 3, 4} and picks == buffer.sample(np.random.default_rng(0), 10)


def test_confusable_mask_marks_partner_patterns():
    labels = np.zeros((2, len(CORE_PATTERNS)), dtype=bool)
    labels[0, CORE_PATTERNS.index("inverted_hammer")] = True
    labels[1, CORE_PATTERNS.index("hammer")] = True
    labels[1, CORE_PATTERNS.index("inverted_hammer")] = True
    mask = training.confusable_mask(labels)
    assert mask[0, CORE_PATTERNS.index("hammer")]
    assert not mask[1, CORE_PATTERNS.index("hammer")]  # it is a hammer too: not a negative


def test_partial_unfreezing_follows_the_config():
    clip = chart_model.create(device="cpu")
    model = clip.model
    training.set_trainable(model, training.Unfreeze(image_layers=2, text_layers=1))
    trunk = model.visual.trunk
    assert not any(p.requires_grad for b in trunk.blocks[:-2] for p in b.parameters())
    assert all(p.requires_grad for b in trunk.blocks[-2:] for p in b.parameters())
    assert not any(p.requires_grad for p in trunk.patch_embed.parameters())
    assert all(p.requires_grad for p in [*trunk.norm.parameters(), *model.visual.head.parameters()])
    layers = model.text.transformer.encoder.layer
    assert not any(p.requires_grad for layer in layers[:-1] for p in layer.parameters())
    assert all(p.requires_grad for p in layers[-1].parameters())
    assert all(p.requires_grad for p in model.text.proj.parameters()) and model.logit_scale.requires_grad
    training.set_trainable(model, training.Unfreeze(image_layers=-1, text_layers=0))
    assert all(p.requires_grad for p in model.visual.parameters())
    assert not any(p.requires_grad for p in model.text.transformer.parameters())


def test_contrastive_loss_treats_identical_captions_as_positives():
    # Image 0 sits on caption 1's embedding: wrong if the captions differ, fine if they are the same caption.
    image = torch.tensor([[0.6, 0.8], [1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    duplicate_aware = training._contrastive(image, text, torch.tensor(20.0), ["a", "a", "b"])
    as_distinct = training._contrastive(image, text, torch.tensor(20.0), ["a", "x", "b"])
    assert float(duplicate_aware) < float(as_distinct)


def test_pretrain_and_finetune_run_and_are_deterministic(windows):
    def run():
        clip = chart_model.create(device="cpu")
        optim = training.OptimConfig(steps=2, batch_size=6, warmup_steps=1, workers=0)
        pre = training.pretrain(clip, windows, training.PretrainConfig(optim=optim, caption_pool=24))
        texts = {p: [p.replace("_", " ")] for p in CORE_PATTERNS}
        fine = training.finetune(clip, windows, training.FinetuneConfig(optim=optim, margin_weight=1.0), texts)
        return clip, pre, fine

    clip_a, pre_a, fine_a = run()
    clip_b, pre_b, fine_b = run()
    assert pre_a.extra["caption_pool"] == 24 and 1 <= pre_a.extra["distinct_captions"] <= 24
    assert {"contrastive", "anatomy"} <= set(pre_a.history.columns)
    assert {"contrastive", "multilabel", "anatomy", "margins"} <= set(fine_a.history.columns)
    for column in ("loss", "anatomy"):
        assert pre_a.history[column].tolist() == pre_b.history[column].tolist()
        assert fine_a.history[column].tolist() == fine_b.history[column].tolist()
    state_a, state_b = clip_a.model.state_dict(), clip_b.model.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_whitening_spreads_features_that_share_a_common_direction():
    rng = np.random.default_rng(0)
    common = rng.normal(size=16)
    common *= np.sqrt(8) / np.linalg.norm(common)
    features = common + 0.5 * rng.normal(size=(200, 16))  # alike, as MiniLM embeds templated captions

    def mean_cosine(x):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        return float((x @ x.T)[~np.eye(len(x), dtype=bool)].mean())

    weight = training.whitening_projection(features, 8, shrinkage=1.0)
    assert weight.shape == (8, 16) and weight.dtype == np.float32
    assert mean_cosine(features) > 0.6 and mean_cosine(features @ weight.T) < 0.45
    # More shrinkage whitens less; the map is a function of its input.
    shrunk = training.whitening_projection(features, 8, 100.0)
    assert mean_cosine(features @ shrunk.T) > mean_cosine(features @ weight.T)
    np.testing.assert_array_equal(weight, training.whitening_projection(features, 8, 1.0))
    with pytest.raises(ValueError, match=r"whitening: need .* got \(200, 16\) and -1"):
        training.whitening_projection(features, 8, -1)
    with pytest.raises(ValueError, match="width >= 32"):
        training.whitening_projection(features, 32, 1.0)


def test_pretraining_whitens_an_untrained_text_projection_only(windows, tmp_path):
    optim = training.OptimConfig(steps=1, batch_size=6, warmup_steps=1, workers=0)
    config = training.PretrainConfig(optim=optim, caption_pool=300)  # at least 256 distinct captions
    clip = chart_model.create(device="cpu")
    created = clip.model.text.proj.weight.clone()
    pool = windows.plan(np.random.default_rng(config.stream.seed), config.caption_pool)
    captions = sorted({windows.anatomy_caption(plan) for plan in pool})
    with torch.no_grad():
        before = clip.encode_texts(captions).float().numpy()
    result = training.pretrain(clip, windows, config)
    assert result.extra["text_whitening"] == config.text_whitening
    assert not torch.equal(created, clip.model.text.proj.weight)
    with torch.no_grad():
        after = clip.encode_texts(captions).float().numpy()
    # The pool's captions move apart, and the text tower stays locked: pre-training changed only the projection,
    # once, before the first step.
    off = ~np.eye(len(captions), dtype=bool)
    assert (after @ after.T)[off].mean() < (before @ before.T)[off].mean() - 0.2
    # A text projection that was trained (loaded through `pretrained`) is left as it is.
    path = chart_model.save_checkpoint(clip, tmp_path / "model.safetensors")
    trained = chart_model.create(chart_model.ModelSpec(pretrained=str(path)), device="cpu")
    weight = trained.model.text.proj.weight.clone()
    again = training.pretrain(trained, windows, config)
    assert again.extra["text_whitening"].startswith("off: the text projection is pretrained")
    assert torch.equal(weight, trained.model.text.proj.weight)
    # Too few captions to estimate 256 directions, or turned off: the projection stays as created.
    for pool, shrinkage, note in ((24, 4.0, "off: 24 distinct captions cannot estimate 256 directions"),
                                  (300, None, "off")):
        fresh = chart_model.create(device="cpu")
        created = fresh.model.text.proj.weight.clone()
        skipped = training.pretrain(fresh, windows, training.PretrainConfig(optim=optim, caption_pool=pool,
                                                                            text_whitening=shrinkage))
        assert skipped.extra["text_whitening"] == note and torch.equal(created, fresh.model.text.proj.weight)


def test_pattern_logits_speed_moves_scale_and_bias_faster_without_changing_the_logits():
    image = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    classes = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    labels = torch.tensor([[1.0, 0.0, 0.0]] * 6)
    moved = {}
    for speed in (1.0, 20.0):
        head = training.PatternLogits(3, speed=speed)
        before = head(image, classes).detach()
        optimizer = torch.optim.Adam(head.parameters(), lr=1e-3)
        torch.nn.functional.binary_cross_entropy_with_logits(head(image, classes), labels).backward()
        optimizer.step()
        moved[speed] = (float(head.scale.log()) - np.log(10.0), before)
    torch.testing.assert_close(moved[1.0][1], moved[20.0][1])  # the same logits before training
    assert abs(moved[20.0][0]) == pytest.approx(20 * abs(moved[1.0][0]), rel=1e-3)
    with pytest.raises(ValueError, match="logit_speed"):
        training.FinetuneConfig(logit_speed=0)


def test_finetune_needs_prompts_for_every_core_pattern(windows):
    clip = chart_model.create(device="cpu")
    with pytest.raises(ValueError, match="hammer"):
        training.finetune(clip, windows, training.FinetuneConfig(optim=training.OptimConfig(steps=1, workers=0)),
                          {p: [p] for p in CORE_PATTERNS if p != "hammer"})


def test_a_locked_text_tower_stays_put_and_an_unlocked_one_trains(windows):
    texts = {p: [p.replace("_", " ")] for p in CORE_PATTERNS}
    optim = training.OptimConfig(steps=2, batch_size=6, warmup_steps=1)
    for lock in (True, False):
        clip = chart_model.create(device="cpu")
        before = {k: v.clone() for k, v in clip.model.text.state_dict().items()}
        image_before = clip.model.visual.trunk.blocks[0].mlp.fc1.weight.clone()
        training.finetune(clip, windows, training.FinetuneConfig(optim=optim, lock_text=lock), texts)
        after = clip.model.text.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert not torch.equal(image_before, clip.model.visual.trunk.blocks[0].mlp.fc1.weight)
        if lock:
            assert not changed
        else:  # the last encoder layer and the projection train, earlier layers do not
            assert any(k.startswith("transformer.encoder.layer.5.") for k in changed)
            assert any(k.startswith("proj") for k in changed)
            assert not any(k.startswith("transformer.encoder.layer.0.") for k in changed)


def test_frozen_batch_norm_layers_keep_their_running_statistics():
    clip = chart_model.create(device="cpu")
    training.set_trainable(clip.model, training.Unfreeze(image_layers=1, text_layers=0))
    clip.model.train()
    training._freeze_batch_norm_statistics(clip.model)
    stem_norms = [m for m in clip.model.visual.trunk.patch_embed.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert stem_norms and not any(m.training for m in stem_norms)
    before = stem_norms[0].running_mean.clone()
    clip.model.visual(torch.randn(4, 3, 224, 224))
    assert torch.equal(before, stem_norms[0].running_mean)
