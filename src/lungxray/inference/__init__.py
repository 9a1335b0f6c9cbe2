"""A bundle on disk to predictions: bundle schema, the predictor, ensemble arithmetic, ONNX engines."""
