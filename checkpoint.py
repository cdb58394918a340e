from model import load_checkpoint  # noqa: F401  (moved in the next commit)
