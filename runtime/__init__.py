"""The tgis runtime: configuration, hub access, models, engine, parallelism and front ends."""
