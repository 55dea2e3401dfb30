"""The ground floor: model building and export, the tokenizer, collation, run folders.

Imports no other lmlab layer, nor datamodules or lightning_modules (tests/test_layers.py).
"""
