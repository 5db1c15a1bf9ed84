"""Thin adapters, one per kind of script: Keras 3 and tf_keras (one adapter), TF1 sessions, custom loops."""
