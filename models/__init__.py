"""The learned model families, one per module (base.py: the interface they share; layers.py: shared layers).
model.py holds the seed model and the registry that builds any of them."""
