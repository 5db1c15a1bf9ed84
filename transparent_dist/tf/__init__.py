"""The TensorFlow layer: gradient exchange, native op, broadcast, input pipelines, placement. Imports TensorFlow, never Keras."""
