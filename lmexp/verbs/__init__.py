"""The verbs of ``lmexp`` that make no training run, one module each.

Each module exposes ``run(argv)``: it parses its own flags (one-line errors, lmexp.arguments)
and does the work. ``lmexp.cli`` imports a verb's module only when that verb is called, so
``lmexp generate`` starts without loading Lightning.
"""
