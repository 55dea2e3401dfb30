"""Inference on a trained model: generation, chat sessions, rejected answers for preference data.

Above lmlab.core, datamodules and lightning_modules; below lmlab.eval and lmlab.train (tests/test_layers.py).
"""
