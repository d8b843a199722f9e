"""Field use: predictions with lineage and an honest rank, and ONNX export."""
