"""Opt-in stand-ins for ``timm`` and ``torchvision`` so that ``import easyeditor`` works on a CPU-only machine.

``import easyeditor`` imports every EasyEdit trainer, and its multimodal ones import ``timm`` and ``torchvision``.
Installing those replaces a CPU build of torch with a CUDA one (no CPU torchvision wheel matches torch 2.13 on
PyPI), so on a CPU machine that only edits text models, call this before importing EasyEdit::

    from mose_easyedit.vision_stubs import stub_vision_packages
    stub_vision_packages()          # only the packages that are missing are stubbed
    from easyeditor import BaseEditor

Every attribute of a stub is a placeholder class that accepts any arguments, so module-level imports and class
definitions succeed; anything that really uses a vision model fails. Real ``timm`` / ``torchvision`` installs are
never touched.
"""
from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import sys
import types

VISION_MODULES = {
    "timm": ("timm", "timm.models", "timm.models.hub", "timm.layers"),
    "torchvision": ("torchvision", "torchvision.datasets", "torchvision.datasets.utils", "torchvision.transforms",
                    "torchvision.transforms.functional"),
}


class _Anything(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return cls


class Placeholder(metaclass=_Anything):
    """Stands in for any class or function of a stubbed package."""

    def __init__(self, *args, **kwargs):
        pass


def _stub_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = []
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)

    def __getattr__(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return Placeholder

    module.__getattr__ = __getattr__
    return module


def stub_vision_packages() -> list[str]:
    """Put stubs for the missing ones of ``timm`` / ``torchvision`` into ``sys.modules``; returns the stubbed
    module names (empty when both are installed)."""
    import transformers.utils.import_utils as import_utils

    # transformers caches these probes: answer them before the stubs exist, so it never takes a stub for the real one
    import_utils.is_torchvision_available()
    import_utils.is_timm_available()
    stubbed = []
    for package, names in VISION_MODULES.items():
        if package in sys.modules or importlib.util.find_spec(package) is not None:
            continue
        for name in names:
            sys.modules[name] = _stub_module(name)
            stubbed.append(name)
    return stubbed


@contextlib.contextmanager
def vision_stubs():
    """:func:`stub_vision_packages` for the duration of a ``with`` block (the stubs are removed afterwards)."""
    stubbed = stub_vision_packages()
    try:
        yield stubbed
    finally:
        for name in stubbed:
            sys.modules.pop(name, None)
