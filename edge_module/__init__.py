"""edge-module: ONNX inference at the edge, metered and licensed like Azure AI containers."""

__version__ = "0.1.0"

CONTAINER_TYPE = "edge-module"
