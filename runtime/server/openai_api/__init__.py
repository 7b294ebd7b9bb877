"""The OpenAI-compatible HTTP API (`/v1`) over the engine the TGIS gRPC API uses."""
