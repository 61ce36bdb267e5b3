"""The file formats a network is read from and written to: lmexp's own (``native``) and
transformers folders (``huggingface``). ``lmexp.checkpoints`` chooses between them."""
