"""Image-encoder backends: the fine-tuned image tower in torch (fp32, or bf16 autocast), or exported to ONNX and run
by ONNX Runtime: fp32; `onnx-int8`, int8 weights for the matrix products with activations quantized per call
(dynamic); `onnx-int8-static`, int8 convolutions and matrix products with activation ranges calibrated once on
validation charts (static, QDQ).

The exported graph takes what the service has in hand, uint8 RGB pixels (n, height, width, 3) at the model's input
size, and returns L2-normalized embeddings: normalization and layout are in the graph, so a request costs one
`np.stack` of Python work before the encoder, and ONNX Runtime runs the whole batch without holding the GIL.
Promotion exports both files into the bundle and picks the fastest backend that passes the accuracy guard
(`vlm_assets.promotion.choose_encoder`); the service runs the bundle's choice (`resolve_encoder`).
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path

import numpy as np

from vlm_assets.storage import atomic_write

BACKENDS = ("torch-fp32", "torch-bf16", "onnx-fp32", "onnx-int8", "onnx-int8-static")
ONNX_FILES = {"onnx-fp32": "image_encoder.onnx", "onnx-int8": "image_encoder.int8.onnx",
              "onnx-int8-static": "image_encoder.int8-static.onnx"}
# Dynamic int8 quantizes only the matrix products: ONNX Runtime's dynamic integer convolution (ConvInteger) ran slower
# than fp32 on the convolutional trunk here, while int8 MatMul halves the transformer's time. With calibrated
# activation ranges the convolutions run as QLinearConv, which is faster than fp32 (docs/benchmarks.md).
INT8_OPS = ["MatMul", "Gemm"]
STATIC_INT8_OPS = ["Conv", "MatMul", "Gemm"]


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"image encoder backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    return backend


def native_bf16(device: str) -> bool:
    """Whether bf16 runs natively here (CUDA with bf16, or a CPU with AVX512-BF16/AMX); emulated bf16 is slower."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def runnable(backend: str, device: str, directory: str | os.PathLike) -> str | None:
    """Why `backend` cannot run here for the bundle in `directory`, or None when it can."""
    if backend == "torch-bf16" and not native_bf16(device):
        return f"{device} has no native bf16"
    if backend in ONNX_FILES and not (Path(directory) / ONNX_FILES[backend]).exists():
        return f"the bundle has no {ONNX_FILES[backend]} (not exported at promotion)"
    return None


def resolve_encoder(directory: str | os.PathLike, manifest: dict, requested: str, device: str) -> tuple[str, str]:
    """The backend to serve and why: `requested`, or for `auto` the fastest backend promotion accepted that runs
    here (bundles from before the ONNX backends recorded only a torch precision)."""
    if requested != "auto":
        unavailable = runnable(check_backend(requested), device, directory)
        if unavailable:
            raise ValueError(f"image encoder backend {requested}: {unavailable}")
        return requested, "set in the service's config"
    serving = manifest.get("serving", {})
    ranking = serving.get("ranking") or [serving.get("encoder") or f"torch-{serving.get('precision', 'fp32')}"]
    for backend in ranking:
        if runnable(backend, device, directory) is None:
            return backend, f"the fastest backend promotion accepted that runs on {device}"
    return "torch-fp32", f"none of the accepted backends ({', '.join(ranking)}) runs on {device}"


def pixel_batch(images: list) -> np.ndarray:
    """(n, height, width, 3) uint8 from RGB PIL images of one size."""
    return np.stack([np.asarray(image, dtype=np.uint8) for image in images])


def _encoder_module(clip):
    """uint8 (n, h, w, 3) -> normalized (n, d): the model's own preprocessing for charts at its input size."""
    import torch

    normalization = clip.input_normalization()
    if normalization is None:
        raise ValueError(f"{clip.spec.name}: its preprocessing is more than resize, crop and normalize; the ONNX "
                         "export covers only that")
    _, mean, std = normalization

    class ImageEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = clip.model.visual
            self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255)
            self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255)

        def forward(self, pixels):
            images = (pixels.permute(0, 3, 1, 2).float() - self.mean) / self.std
            return torch.nn.functional.normalize(self.visual(images), dim=-1)

    return ImageEncoder().to(clip.device).eval()


def export_onnx(clip, path: str | os.PathLike) -> None:
    """The image tower with its normalization as one ONNX graph with a dynamic batch dimension (atomic write)."""
    import torch

    module = _encoder_module(clip)
    (height, width), _, _ = clip.input_normalization()
    example = torch.zeros((2, height, width, 3), dtype=torch.uint8, device=clip.device)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's progress chatter
        program = torch.onnx.export(module, (example,), input_names=["pixels"], output_names=["embeddings"],
                                    dynamic_shapes=({0: batch},), dynamo=True, external_data=False, verbose=False)
    buffer = io.BytesIO()
    program.save(buffer)
    atomic_write(Path(path), buffer.getvalue())


def quantize_int8(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """int8 weights for the matrix products of `source`, activations quantized per call (atomic write)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _staged(target) as staged, _quiet_quantizer():
        quantize_dynamic(str(source), str(staged), weight_type=QuantType.QInt8, op_types_to_quantize=INT8_OPS)


def quantize_int8_static(source: str | os.PathLike, target: str | os.PathLike, pixels: np.ndarray,
                         batch_size: int = 16) -> None:
    """int8 convolutions and matrix products of `source` (weights per channel, activations per tensor) with activation
    ranges calibrated on `pixels`, uint8 (n, height, width, 3) charts the model was not tested on (atomic write)."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if pixels.ndim != 4 or pixels.shape[-1] != 3 or pixels.dtype != np.uint8 or len(pixels) == 0:
        raise ValueError(f"calibration pixels: expected uint8 (n >= 1, height, width, 3), got {pixels.dtype} "
                         f"{pixels.shape}")

    class Charts(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(range(0, len(pixels), batch_size))

        def get_next(self):
            start = next(self.batches, None)
            return None if start is None else {"pixels": pixels[start:start + batch_size]}

    with _staged(target) as staged, _quiet_quantizer():
        # Shape inference and graph folding first (BatchNorm into its convolution), as ONNX Runtime advises; the
        # symbolic pass cannot follow the exporter's dynamic-batch Expand, ONNX's own inference can.
        prepared = staged.with_suffix(".prepared.onnx")
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(staged), Charts(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=STATIC_INT8_OPS, calibrate_method=CalibrationMethod.MinMax)


@contextlib.contextmanager
def _staged(target: str | os.PathLike):
    """A path in a scratch directory beside `target`, moved onto `target` when the block succeeds."""
    import tempfile

    target = Path(target)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        staged = Path(scratch) / target.name
        yield staged
        os.replace(staged, target)


@contextlib.contextmanager
def _quiet_quantizer():
    """The quantizer logs its generic advice on pre-processing as warnings."""
    import logging

    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


class OnnxEncoder:
    """An exported image encoder in ONNX Runtime: uint8 pixels in, normalized float32 embeddings out."""

    def __init__(self, path: str | os.PathLike, device: str = "cpu", threads: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: ONNX Runtime's default, one per core
        options.inter_op_num_threads = 1
        # Idle pool threads sleep instead of spinning: spinning wins ~0.2 ms per call but burns the core the event
        # loop needs for the next requests (measured: 7 ms of CPU for a 2.6 ms batch-1 call on 2 threads).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CUDAExecutionProvider"] if device.startswith("cuda") and \
            "CUDAExecutionProvider" in ort.get_available_providers() else []
        self.session = ort.InferenceSession(str(path), options, providers=[*providers, "CPUExecutionProvider"])

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"pixels": pixels})[0]
