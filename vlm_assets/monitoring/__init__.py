"""Monitoring and drift (Phase 5): the drift reference, drift statistics of the prediction log, the fast alert check
and its alerts, the weekly report and the drift simulation. Plain library code; the Dagster assets are in
`vlm_assets.pipeline.monitoring`."""
