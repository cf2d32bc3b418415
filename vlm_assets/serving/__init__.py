"""Inference: request validation, the bundle predictor, in-process batching, the durable prediction log and the
market-data store for `/embeddings`. Plain library code; the BentoML service in `bento/service.py` wires it."""

from vlm_assets.serving.prediction_log import PredictionLog, read_predictions

__all__ = ["PredictionLog", "read_predictions"]
