"""Promotion into the BentoML model store, the predictor, the service class called directly, and a real
`bentoml serve` on a loopback port exercised over HTTP (tiny pipeline; the test session has its own BENTOML_HOME)."""

import asyncio
import concurrent.futures
import hashlib
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest
from dagster import materialize
from PIL import Image

from bench.common import Server, bad_requests, check_outcomes, png_base64, synthetic_bars, worker_pids
from vlm_assets import promotion
from vlm_assets.cli import main as cli
from vlm_assets.features import FEATURE_NAMES, MARKET_FEATURES
from vlm_assets.labeling import CORE_PATTERNS
from vlm_assets.pipeline.checks import SERVING_CHECKS
from vlm_assets.pipeline.serving import promoted_model
from vlm_assets.serving import encoders
from vlm_assets.serving.prediction_log import read_predictions
from vlm_assets.serving.predictor import Predictor, embedding_id
from vlm_assets.serving.requests import parse_bars
from vlm_assets.storage import ArtifactStore
from tests.conftest import tiny_resources

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
NAME = "serving_test"  # this module's model in the session's model store (other tests run the main job too)
SERVED = {"CANDLE_VLM_MODEL": f"{NAME}:latest"}


def promote(root, **config):
    result = materialize([promoted_model, *SERVING_CHECKS], resources=tiny_resources(root),
                         run_config={"ops": {"promoted_model": {"config": {"model_name": NAME} | config}}})
    assert result.success
    checks = check_outcomes(result)
    assert checks == {"promoted_bundle_serves": True, "serving_matches_fuser": True}, checks
    return result.get_asset_materialization_events()[0].materialization.metadata


@pytest.fixture(scope="module")
def promoted(model_run):
    root, _ = model_run
    metadata = promote(root)
    return root, metadata


def test_promotion_scores_through_the_serving_path_and_keeps_every_version(promoted, tmp_path):
    root, metadata = promoted
    store = ArtifactStore(root)
    assert metadata["decision"].value == "promoted" and metadata["reason"].value == "no model is promoted yet"
    current = promotion.promoted(NAME)
    assert str(current.tag) == metadata["model_tag"].value
    labels = current.info.labels
    assert labels["dataset_version"] == store.current_version("vlm_dataset") and labels["bundle_id"]
    # What promotion measured through the predictor is what the fuser reported for its active fusion on test.
    fuser_report = store.read_json(f"fuser/{store.current_version('fuser')}/report.json")
    assert metadata["test_macro_f1"].value == pytest.approx(fuser_report["summary"]["fused_test_macro_f1"], abs=1e-9)
    with open(os.path.join(current.path, "bundle.json")) as handle:
        manifest = json.load(handle)
    assert manifest["parts"]["fuser"] == store.current_version("fuser")
    assert manifest["dataset_version"] == labels["dataset_version"]
    # Promotion exported the ONNX encoders into the bundle, scored every backend through the serving path and
    # ranked the ones the accuracy guard accepts by measured latency; the served one is the fastest of them.
    serving = manifest["serving"]
    for name in encoders.ONNX_FILES.values():
        assert manifest["files"][name] == hashlib.sha256(pathlib.Path(current.path, name).read_bytes()).hexdigest()
    candidates = serving["candidates"]
    assert set(candidates) == set(encoders.BACKENDS) and candidates["torch-fp32"]["accepted"]
    assert candidates["onnx-fp32"]["macro_f1"] == pytest.approx(candidates["torch-fp32"]["macro_f1"], abs=0.005)
    assert serving["ranking"][0] == serving["encoder"] == metadata["image_encoder"].value
    assert [candidates[b]["encode_ms"] for b in serving["ranking"]] == sorted(
        candidates[b]["encode_ms"] for b in serving["ranking"])
    for backend, row in candidates.items():
        assert row["accepted"] == (backend in serving["ranking"]), row
        if backend != "torch-fp32" and "encode_ms" in row:
            assert ("within" in row["reason"]) == row["accepted"]

    # Not worse is the rule: an impossible margin keeps the promoted model, and says why.
    kept = promote(root, tolerance=-1.0)
    assert kept["decision"].value == "kept" and "kept the promoted model" in kept["reason"].value
    assert str(promotion.promoted(NAME).tag) == str(current.tag)
    forced = promote(root, force=True)
    assert forced["decision"].value == "promoted" and forced["model_tag"].value != str(current.tag)
    assert len(promotion.history(NAME)) == 2

    # A rollback is one command; it adds a version, never rewrites history.
    assert cli(["rollback", "--name", NAME]) == 0
    versions = promotion.history(NAME)
    assert len(versions) == 3 and versions[-1].info.labels["rollback_of"] == str(versions[0].tag.version)
    assert versions[-1].info.labels["bundle_id"] == versions[0].info.labels["bundle_id"]
    assert str(promotion.promoted(NAME).tag) == str(versions[-1].tag)
    assert cli(["models", "--name", NAME]) == 0
    with pytest.raises(ValueError, match="no candle_other model"):
        promotion.rollback(name="candle_other")

    # A version this code cannot load (here: weights of another image-tower shape) is never made current again.
    from safetensors.numpy import load_file, save_file

    foreign = tmp_path / "foreign"
    shutil.copytree(versions[0].path, foreign, ignore=shutil.ignore_patterns("model.yaml"))
    weights = load_file(foreign / "model.safetensors")
    stem = next(k for k in weights if k.startswith("visual.") and weights[k].ndim == 4)
    save_file(weights | {stem: weights[stem][:-1]}, foreign / "model.safetensors")
    foreign_tag = promotion.save_to_store(foreign, json.loads((foreign / "bundle.json").read_text()),
                                          json.loads(versions[0].info.metadata["test_metrics"]), NAME)
    good = promotion.rollback(name=NAME)  # away from the foreign version, to the one before it
    with pytest.raises(ValueError, match="cannot be served by this version.*weights do not fit ChartCLIP-S"):
        promotion.rollback(to=foreign_tag, name=NAME)
    assert str(promotion.promoted(NAME).tag) == good and len(promotion.history(NAME)) == 5
    # An incumbent this code cannot score does not block a promotion, and the reason says so.
    promotion.save_to_store(foreign, json.loads((foreign / "bundle.json").read_text()),
                            json.loads(versions[0].info.metadata["test_metrics"]), NAME)
    replaced = promote(root)
    assert replaced["decision"].value == "promoted" and len(promotion.history(NAME)) == 7
    assert "cannot be scored by this code" in replaced["reason"].value
    assert replaced["reason"].value.endswith("promoted without a comparison")


def test_predictor_answers_trained_library_and_free_text_patterns(promoted):
    predictor = Predictor(promotion.promoted(NAME).path)
    frame = parse_bars(synthetic_bars(100))
    window = predictor.window(frame)
    image = predictor.render(window)
    embedding = predictor.encode([image])[0]
    assert embedding.shape == (256,) and np.linalg.norm(embedding) == pytest.approx(1.0, abs=1e-4)
    assert embedding_id(predictor.encode([image])[0]) == embedding_id(embedding)  # same chart, same id
    features = predictor.features([window])[0]
    asked = ["Hammer", "shooting star", "a long upper wick after a rally"]
    answer = predictor.score_patterns(embedding, asked, features)
    assert answer["kind"] == {"Hammer": "trained", "shooting star": "zero_shot_library",
                              "a long upper wick after a rally": "zero_shot_text"}
    assert answer["calibrated"] == {"Hammer": True, "shooting star": False, "a long upper wick after a rally": False}
    assert all(0.0 <= p <= 1.0 for p in answer["probabilities"].values())
    assert set(answer["detected"]) == {"Hammer"} and answer["fusion"] in ("late", "learned")
    image_only = predictor.score_patterns(embedding, list(CORE_PATTERNS))
    assert "features" not in image_only["sources"]  # no bars, no engineered features: the image models answer
    # The zero-shot softmax over the library sums to one; a free-text share is in (0, 1).
    assert predictor.zero_shot_classes(embedding[None, :]).sum() == pytest.approx(1.0)
    shares = predictor.prompt_probabilities(embedding[None, :], ["a hammer", "a doji", "an inside bar"])
    assert shares.sum() == pytest.approx(1.0)
    # Every backend encodes the same chart to nearly the same embedding (the promotion guard decides on accuracy).
    for backend in ("torch-bf16", "onnx-fp32", "onnx-int8", "onnx-int8-static"):
        other = Predictor(promotion.promoted(NAME).path, backend=backend).encode([image, image.rotate(90)])
        assert float(other[0] @ embedding) > {"onnx-fp32": 0.9999, "onnx-int8-static": 0.98}.get(backend, 0.99), backend
        assert np.linalg.norm(other, axis=1) == pytest.approx([1.0, 1.0], abs=1e-2)  # bf16 keeps ~3 digits
    with pytest.raises(ValueError, match="backend 'onnx-fp16'"):
        Predictor(promotion.promoted(NAME).path, backend="onnx-fp16")


def test_backend_resolution_follows_the_promotion_ranking(promoted, tmp_path):
    bundle = promotion.promoted(NAME).path
    with open(os.path.join(bundle, "bundle.json")) as handle:
        manifest = json.load(handle)
    backend, _ = encoders.resolve_encoder(bundle, manifest, "auto", "cpu")
    assert backend == next(b for b in manifest["serving"]["ranking"] if encoders.runnable(b, "cpu", bundle) is None)
    assert encoders.resolve_encoder(bundle, manifest, "onnx-fp32", "cpu")[0] == "onnx-fp32"
    # A bundle without the exported files cannot serve ONNX: auto falls back, an explicit request is refused.
    bare = tmp_path / "bare"
    bare.mkdir()
    ranked = {"serving": {"ranking": ["onnx-int8", "onnx-fp32", "torch-fp32"]}}
    assert encoders.resolve_encoder(bare, ranked, "auto", "cpu")[0] == "torch-fp32"
    with pytest.raises(ValueError, match="no image_encoder.int8.onnx"):
        encoders.resolve_encoder(bare, ranked, "onnx-int8", "cpu")
    # Bundles promoted before the ONNX backends recorded a torch precision.
    assert encoders.resolve_encoder(bare, {"serving": {"precision": "fp32"}}, "auto", "cpu")[0] == "torch-fp32"


def test_an_encoder_the_guard_refuses_is_not_served(promoted, tmp_path):
    # An impossible bound (a negative drop) refuses every backend but the reference.
    root, _ = promoted
    from vlm_assets.pipeline.serving import _test_split

    split = _test_split(ArtifactStore(root))
    bundle = tmp_path / "bundle"
    manifest = promotion.assemble_bundle(ArtifactStore(root), bundle, "test")
    reference = Predictor(bundle)
    serving = promotion.choose_encoder(manifest, reference, split, promotion.score(reference, split),
                                       ["onnx-int8"], max_drop=-1.0)
    assert serving["encoder"] == "torch-fp32" and serving["ranking"] == ["torch-fp32"]
    assert not serving["candidates"]["onnx-int8"]["accepted"]
    assert "beyond" in serving["candidates"]["onnx-int8"]["reason"]
    assert (bundle / "image_encoder.int8.onnx").exists() and "image_encoder.int8.onnx" in manifest["files"]


def test_static_int8_is_calibrated_on_validation_charts_and_refused_without_them(promoted, tmp_path):
    root, _ = promoted
    from vlm_assets.pipeline.serving import _calibration_charts, _test_split

    store = ArtifactStore(root)
    split = _test_split(store)
    charts = _calibration_charts(store, 8)
    val = {png for png, part in zip(*_dataset_pngs(store)) if part == "val"}
    assert len(charts) == 8 and set(charts) <= val and not set(charts) & set(split.pngs)
    bundle = tmp_path / "bundle"
    manifest = promotion.assemble_bundle(store, bundle, "test")
    reference = Predictor(bundle)
    scores = promotion.score(reference, split)
    refused = promotion.choose_encoder(manifest, reference, split, scores, ["onnx-int8-static"], max_drop=1.0)
    row = refused["candidates"]["onnx-int8-static"]
    assert not row["accepted"] and "no calibration charts" in row["reason"]
    assert not (bundle / encoders.ONNX_FILES["onnx-int8-static"]).exists()
    serving = promotion.choose_encoder(manifest, reference, split, scores, ["onnx-int8-static"], max_drop=1.0,
                                       calibration=charts)
    assert serving["calibration_charts"] == 8 and serving["candidates"]["onnx-int8-static"]["accepted"]
    static = bundle / encoders.ONNX_FILES["onnx-int8-static"]
    assert manifest["files"][static.name] == hashlib.sha256(static.read_bytes()).hexdigest()
    # The convolutions and matrix products run on int8: every one of them reads dequantized int8 weights.
    import onnx

    graph = onnx.load(str(static)).graph
    producers = {output: node.op_type for node in graph.node for output in node.output}
    weighted = [node for node in graph.node if node.op_type in encoders.STATIC_INT8_OPS]
    assert weighted and all(producers.get(node.input[1]) == "DequantizeLinear" for node in weighted)
    # The same charts give the same file.
    again = tmp_path / "again.onnx"
    pixels = encoders.pixel_batch([reference.chart_image(Image.open(io.BytesIO(png))) for png in charts])
    encoders.quantize_int8_static(bundle / encoders.ONNX_FILES["onnx-fp32"], again, pixels)
    assert again.read_bytes() == static.read_bytes()
    with pytest.raises(ValueError, match=r"calibration pixels: expected uint8 .* got float32 \(2, 224, 224, 3\)"):
        encoders.quantize_int8_static(bundle / encoders.ONNX_FILES["onnx-fp32"], again, pixels[:2].astype(np.float32))


def _dataset_pngs(store):
    from vlm_assets.pipeline.model import dataset_windows

    windows = dataset_windows(store)
    return windows["png"].tolist(), windows["split"].tolist()


def test_the_service_class_called_directly(promoted, tmp_path, monkeypatch):
    root, _ = promoted
    monkeypatch.setenv("CANDLE_VLM_ARTIFACT_ROOT", str(root))
    monkeypatch.setenv("CANDLE_VLM_PREDICTION_LOG", str(tmp_path / "log"))
    monkeypatch.setenv("CANDLE_VLM_LOG_FSYNC", "false")
    monkeypatch.setenv("CANDLE_VLM_MODEL", SERVED["CANDLE_VLM_MODEL"])
    from bento.service import Bar, CandleVLM  # reads its CANDLE_VLM_* settings on import

    service = CandleVLM()
    bars = [Bar(**b) for b in synthetic_bars(100)]
    reply = asyncio.run(service.predict_patterns(symbol="ACME", timeframe="5m", bars=bars, patterns=["hammer", "doji"]))
    assert reply.status_code == 200
    answer = json.loads(reply.body)
    assert answer["model_version"] == str(promotion.promoted(NAME).tag)
    assert set(answer["probabilities"]) == {"hammer", "doji"} and answer["bars_used"] == 100
    # With bars, the trading signal of the promoted gate over every trained pattern, as the library computes it.
    signal = answer["signal"]
    assert signal["direction"] in ("long", "short", "flat") and signal["gated"] == (signal["direction"] != "flat")
    assert 0.0 <= signal["confidence"] <= 1.0 and signal["reasons"]
    frame = parse_bars(synthetic_bars(100))
    window = service.predictor.window(frame)
    image = service.predictor.render(window)
    resnet = service.predictor.resnet_outputs([image]) if "resnet" in service.predictor.sources_for(True) else None
    trained = service.predictor.trained(service.predictor.encode([image]), service.predictor.features([window]),
                                        resnet)
    expected = service.predictor.signal_gate.signal(dict(zip(CORE_PATTERNS, trained.probabilities[0])),
                                                    service.predictor.features([window])[0], "5m")
    assert signal == json.loads(json.dumps(expected))
    with open(os.path.join(promotion.promoted(NAME).path, "bundle.json")) as handle:
        assert json.load(handle)["parts"]["gated_signals"] == ArtifactStore(root).current_version("gated_signals")
    refused = asyncio.run(service.predict_patterns(symbol="ACME", timeframe="5m", bars=bars[:3]))
    assert refused.status_code == 400 and b"3 bars given" in refused.body
    both = asyncio.run(service.predict_patterns(symbol="ACME", timeframe="5m"))
    assert both.status_code == 400 and b"exactly one of bars or image_base64" in both.body
    logged = read_predictions(tmp_path / "log")
    assert list(logged["request_id"]) == [answer["request_id"]]  # only answered requests are logged
    assert logged["signal"].iloc[0] == {k: signal[k] for k in ("direction", "confidence", "gated")}
    # The bars' market state, kept for drift monitoring (not part of the answer).
    features = dict(zip(FEATURE_NAMES, service.predictor.features([window])[0]))
    assert logged["market"].iloc[0] == {name: features[name] for name in MARKET_FEATURES} and "market" not in answer


def _call(url, path, body=None, timeout=60):
    """`body`: a dict sent as JSON, raw bytes sent as they are, or None for a GET."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
            return response.status, json.loads(raw) if response.headers.get_content_type() == "application/json" \
                else raw.decode()
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def _error_text(body) -> str:
    return json.dumps(body)


def _answer_headers(url):
    """The headers (case-insensitive) and request id of an answered /predict/patterns request."""
    body = json.dumps({"symbol": "ACME", "timeframe": "5m", "bars": synthetic_bars(60)}).encode()
    request = urllib.request.Request(url + "/predict/patterns", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200
        return response.headers, json.loads(response.read())["request_id"]


def test_bentoml_serve_over_http(promoted, tmp_path):
    root, _ = promoted
    log_dir = tmp_path / "predictions"
    env = {"CANDLE_VLM_ARTIFACT_ROOT": str(root), "CANDLE_VLM_PREDICTION_LOG": str(log_dir), "CANDLE_VLM_THREADS": "2",
           **SERVED}
    with Server(env, log_path=str(tmp_path / "server.log")) as server:
        url = server.url
        bars = synthetic_bars(100)
        status, answer = _call(url, "/predict/patterns", {"symbol": "ACME", "timeframe": "5m", "bars": bars,
                                                          "patterns": ["hammer", "a long lower shadow"]})
        assert status == 200, answer
        assert {"probabilities", "calibrated", "latency_ms", "model_version", "embedding_id"} <= set(answer)
        assert answer["calibrated"] == {"hammer": True, "a long lower shadow": False}
        assert answer["model_version"] == str(promotion.promoted(NAME).tag) and answer["latency_ms"] > 0
        answered = [answer["request_id"]]
        # Tracing is off by default: no span, hence no span id in the headers (see the next test for it on).
        headers, request_id = _answer_headers(url)
        assert "X-BentoML-Request-ID" not in headers
        answered.append(request_id)

        chart = Predictor.chart_image(Image.new("RGB", (320, 200), "white"))
        status, by_image = _call(url, "/predict/patterns", {"symbol": "ACME", "timeframe": "1h",
                                                            "image_base64": png_base64(chart)})
        assert status == 200 and set(by_image["probabilities"]) == set(CORE_PATTERNS)
        assert all(by_image["calibrated"].values()) and "features" not in by_image["sources"]
        answered.append(by_image["request_id"])

        status, zero = _call(url, "/query/zero_shot", {"image_base64": png_base64(chart),
                                                       "prompts": ["a hammer", "a doji", "three white soldiers"]})
        assert status == 200 and sum(zero["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert not any(zero["calibrated"].values())
        answered.append(zero["request_id"])

        status, latest = _call(url, "/embeddings?symbol=AAA&timeframe=5m&lookback=60")
        assert status == 200 and len(latest["embedding"]) == 256 and latest["bars_used"] == 60
        assert set(latest["probabilities"]) == set(CORE_PATTERNS)
        answered.append(latest["request_id"])
        status, missing = _call(url, "/embeddings?symbol=ZZZ&timeframe=5m&lookback=60")
        assert status == 404 and "no bars for symbol 'ZZZ'" in missing["error"]

        status, batch = _call(url, "/embed_charts", {"charts": [{"bars": bars}, {"image_base64": png_base64(chart)}]})
        assert status == 200 and np.asarray(batch).shape == (2, 256)

        workers = worker_pids(server.process.pid)
        for case in bad_requests(bars):  # every refusal the service promises, each with its status and message
            status, reply = _call(url, case.path, case.body)
            assert status == case.status and case.message in _error_text(reply), (case.name, status, reply)

        # Concurrent requests share encoder batches; every answer is logged before it is sent.
        def one(i):
            return _call(url, "/predict/patterns", {"symbol": "ACME", "timeframe": "5m", "bars": synthetic_bars(80, i)})

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(one, range(48)))
        assert all(status == 200 for status, _ in replies)
        answered += [reply["request_id"] for _, reply in replies]
        status, metrics = _call(url, "/metrics")
        sizes = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines()
                 if line.startswith("candle_vlm_encode_batch_size_")}
        assert sizes["candle_vlm_encode_batch_size_sum"] > sizes["candle_vlm_encode_batch_size_count"]  # batches > 1
        assert "candle_vlm_predictions_total" in metrics and "bentoml_service_request_duration_seconds" in metrics
        assert 'candle_vlm_rejected_requests_total{endpoint="predict_patterns",status="413"}' in metrics
        # Nothing above took a worker down: the same processes still serve.
        assert _call(url, "/readyz")[0] == 200 and worker_pids(server.process.pid) == workers
    logged = read_predictions(log_dir)
    assert sorted(logged["request_id"]) == sorted(answered)
    assert {"embedding", "probabilities", "latency_ms", "model_version", "embedding_id"} <= set(logged.columns)
    with_bars = logged["input"].isin(["bars", "market"])
    assert with_bars.any() and (~with_bars).any()
    assert logged.loc[with_bars, "market"].map(lambda state: set(state) == set(MARKET_FEATURES)).all()
    assert logged.loc[~with_bars, "market"].isna().all()  # a screenshot has no bars, so no market state


def test_tracing_turned_on_brings_back_the_request_spans(promoted, tmp_path):
    root, _ = promoted
    env = {"CANDLE_VLM_ARTIFACT_ROOT": str(root), "CANDLE_VLM_PREDICTION_LOG": str(tmp_path / "predictions"),
           "CANDLE_VLM_TRACING": "true", "CANDLE_VLM_WORKERS": "1", **SERVED}
    with Server(env, log_path=str(tmp_path / "server.log")) as server:
        assert "X-BentoML-Request-ID" in _answer_headers(server.url)[0]


def test_bentoml_build_packages_the_service_with_the_promoted_model(promoted):
    """`bentoml build` from the repository root ([tool.bentoml.build] in pyproject.toml); nothing is locked or
    downloaded, so it works offline."""
    import bentoml

    repo = pathlib.Path(__file__).resolve().parents[1]
    command = [str(pathlib.Path(sys.executable).with_name("bentoml")), "build", "."]
    built = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=300,
                           env={**os.environ, **SERVED,
                                "PATH": f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}"})
    assert built.returncode == 0, built.stdout + built.stderr
    bento = bentoml.bentos.get("candle-vlm:latest")
    src = pathlib.Path(bento.path) / "src"
    assert (src / "bento" / "service.py").exists() and (src / "vlm_assets" / "serving" / "predictor.py").exists()
    assert [str(m.tag) for m in bento.info.services[0].models] == [str(promotion.promoted(NAME).tag)]
