"""The documented interface is the code's: docs/architecture.md's two interface tables name exactly the public
members of models.base.CodingModel, and every model kind implements all of its abstract methods."""
import os
import re

from conftest import ROOT, TINY_CTX, TINY_HYPER, TINY_RD, TINY_SEED
from model import build_model
from models.base import CodingModel


def documented_members():
    """The identifiers in backticks in the first column of the interface tables."""
    text = open(os.path.join(ROOT, "docs", "architecture.md"), encoding="utf-8").read()
    section = text[text.index("## The coding interface") : text.index("## Adding a model")]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    return {re.match(r"\w+", name).group(0) for cell in rows for name in re.findall(r"`([^`]+)`", cell)}


def test_the_interface_tables_name_exactly_the_base_class():
    module = dir(__import__("torch").nn.Module)  # what every network has, unless the interface redefines it (forward)
    members = {n for n in dir(CodingModel) if not n.startswith("_") and (n not in module or n in vars(CodingModel))}
    assert documented_members() == members


def test_every_kind_implements_the_abstract_interface():
    for config in (TINY_SEED, TINY_RD, TINY_HYPER, TINY_CTX):
        model = build_model(config)  # an unimplemented abstract method would make this a TypeError
        assert isinstance(model, CodingModel) and not getattr(type(model), "__abstractmethods__", ())
