"""The embedded demo: a byte-level tokenizer, chain-arithmetic data, and tiny SFT-built teacher and student.

The assets under ``assets/`` ship with the package and are named ``demo:<name>`` in configs.
"""
