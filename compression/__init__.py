"""lmexp's compression toolkit: pruning, quantization and distillation of trained lmexp
networks, and one report that weighs what each method costs against what it saves.

Run ``python -m compression prune|quantize|distill|report --help``.
"""
