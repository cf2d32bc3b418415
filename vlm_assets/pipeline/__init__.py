"""The Dagster layer: thin assets over the library, their checks, jobs and schedules."""
