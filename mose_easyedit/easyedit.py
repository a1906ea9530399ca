"""The EasyEdit bridge: find an EasyEdit checkout at run time and register this package's methods in it.

EasyEdit is optional. Nothing here imports it until asked (``import mose_easyedit`` only puts the checkout named
by ``EASYEDIT_PATH`` on ``sys.path``): :func:`find_easyedit` imports it, :func:`register` adds our
``apply_X_to_model`` functions to EasyEdit's ``ALG_DICT`` and to its batch-edit whitelist, and
:func:`autoregister` (called by ``import mose_easyedit``) registers as soon as EasyEdit is imported, whichever of
the two packages is imported first.

Names. Our method ``X`` is registered as ``X`` when EasyEdit has no method of that name, and always also as
``X-core``. When EasyEdit already has ``X`` (it has ROME, MEMIT, EMMET and AlphaEdit) its own stays under ``X``
and ours is reachable only as ``X-core``, unless ``register(replace=True)``. So ``alg_name: X-core`` in a YAML file
always selects ours; the hparams classes accept both spellings and keep the one written, because BaseEditor looks
``hparams.alg_name`` up in ``ALG_DICT`` as it stands.

Padding. BaseEditor sets ``tok.padding_side = 'left'`` for every ``alg_name`` outside
:data:`EASYEDIT_RIGHT_PADDING_NAMES` (and ``'right'`` for those, on llama/qwen/mistral models), so ``MOSE`` and
every ``X-core`` run with left padding and a ``replace=True`` ``MEMIT`` with right padding. Our core pads every
batch itself and never reads ``padding_side``, so either side gives the same edit.

Registration state (what we added, what ``replace=True`` displaced) lives on EasyEdit's ``BatchEditor`` class,
next to the whitelist check it patches, so it survives a reload of this module and dies with EasyEdit's.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger(__name__)

EASYEDIT_PATH_ENV = "EASYEDIT_PATH"
CORE_SUFFIX = "-core"
# BaseEditor.__init__ gives these names right padding (llama/qwen/mistral); every other name gets left padding.
EASYEDIT_RIGHT_PADDING_NAMES = ("ROME", "MEMIT", "EMMET", "EAMET", "R-ROME", "AlphaEdit", "CORE", "SPHERE")

_ALG_DICT_MODULE = "easyeditor.util.alg_dict"
_BATCH_EDITOR_MODULE = "easyeditor.editors.batch_editor"
_STATE_ATTRIBUTE = "_mose_easyedit_plugin"


def accepted_alg_names(name: str) -> tuple[str, str]:
    """The ``alg_name`` values a YAML file may give for our method ``name``: ``(name, name + '-core')``."""
    return name, name + CORE_SUFFIX


# --------------------------------------------------------------------------------------------------- discovery
def checkout_on_path() -> Path | None:
    """Put the checkout named by ``EASYEDIT_PATH`` first on ``sys.path`` (once); returns it, or None when the
    variable is unset or names no checkout (that is logged as a warning). ``import mose_easyedit`` calls this, so
    ``import easyeditor`` works right after it."""
    checkout = os.environ.get(EASYEDIT_PATH_ENV)
    if not checkout:
        return None
    root = Path(checkout).expanduser().resolve()
    if not (root / "easyeditor" / "__init__.py").is_file():
        logger.warning("%s=%s is not an EasyEdit checkout (no easyeditor/__init__.py)", EASYEDIT_PATH_ENV, checkout)
        return None
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return root


def _import_easyeditor() -> tuple[Any | None, str | None]:
    """``(module, None)``, or ``(None, why not)``; never raises."""
    checkout_on_path()
    try:
        return importlib.import_module("easyeditor"), None
    except ImportError as exc:
        if exc.name == "easyeditor":
            return None, f"no module named 'easyeditor' (set {EASYEDIT_PATH_ENV} or put a checkout on PYTHONPATH)"
        logger.warning("EasyEdit was found but cannot be imported: %s", exc)
        return None, f"importing easyeditor failed: {exc}"
    except Exception as exc:  # a broken checkout must never break `import mose_easyedit`
        logger.warning("importing EasyEdit failed (%s: %s); the EasyEdit plugin is disabled", type(exc).__name__, exc)
        return None, f"importing easyeditor raised {type(exc).__name__}: {exc}"


def find_easyedit():
    """The ``easyeditor`` module, or ``None`` when it cannot be imported.

    ``EASYEDIT_PATH`` (a checkout's root, the folder holding ``easyeditor/``) is put first on ``sys.path``.
    A missing EasyEdit is silent; one that is present but fails to import is logged as a warning.
    """
    module, _why = _import_easyeditor()
    return module


# ------------------------------------------------------------------------------------------------ registration
@dataclass
class _HostState:
    """What this plugin changed in one EasyEdit import; stored on its ``BatchEditor`` class."""

    original_is_batchable: Callable[[str], bool]
    batchable: set[str] = field(default_factory=set)
    registered: dict[str, Callable] = field(default_factory=dict)  # EasyEdit name -> our function put there
    displaced: dict[str, Callable] = field(default_factory=dict)  # EasyEdit name -> its function (replace=True)

    def owns(self, alg_dict: dict, name: str) -> bool:
        return name in self.registered and alg_dict.get(name) is self.registered[name]


def _host(install: bool = True):
    """``(ALG_DICT, BatchEditor, state)`` of the imported EasyEdit; ``install`` patches the whitelist check once
    (without it, ``state`` is ``None`` until something was registered)."""
    # `import easyeditor.util.alg_dict as m` fails: easyeditor/__init__ star-imports shadow the subpackages.
    alg_dict = importlib.import_module(_ALG_DICT_MODULE).ALG_DICT
    batch_editor = importlib.import_module(_BATCH_EDITOR_MODULE).BatchEditor
    state = batch_editor.__dict__.get(_STATE_ATTRIBUTE)
    if state is None and install:
        # A staticmethod on an Enum: editor.py calls BatchEditor.is_batchable_method(name), so replacing the
        # class attribute reaches every caller. The original check stays in force for EasyEdit's own names.
        state = _HostState(original_is_batchable=batch_editor.is_batchable_method)

        def is_batchable_method(alg_name: str) -> bool:
            return alg_name in state.batchable or state.original_is_batchable(alg_name)

        batch_editor.is_batchable_method = staticmethod(is_batchable_method)
        setattr(batch_editor, _STATE_ATTRIBUTE, state)
    return alg_dict, batch_editor, state


def _method_specs(methods) -> list:
    from .methods import METHODS

    if methods is None:
        return list(METHODS.values())
    if isinstance(methods, Mapping):
        methods = methods.values()
    elif isinstance(methods, str) or not isinstance(methods, Iterable):
        methods = [methods]
    specs = []
    for item in methods:
        if isinstance(item, str):
            if item not in METHODS:
                raise ValueError(f"unknown method {item!r}; this package has {sorted(METHODS)}")
            item = METHODS[item]
        if not isinstance(getattr(item, "name", None), str) or not callable(getattr(item, "apply", None)):
            raise TypeError(f"expected a method name or a MethodSpec (.name, .apply), got {item!r}")
        specs.append(item)
    return specs


def register(methods=None, *, replace: bool = False) -> dict[str, str]:
    """Make our methods selectable by ``hparams.alg_name`` in EasyEdit's ``BaseEditor``; idempotent.

    ``methods``: ``None`` (all of :data:`mose_easyedit.methods.METHODS`), a mapping of specs, or an iterable of
    method names / specs. Each method ``X`` goes into ``ALG_DICT`` (the dict ``BaseEditor.__init__`` reads) as
    ``X-core`` and, if EasyEdit has no ``X`` of its own or ``replace`` is true, as ``X``; each registered name
    is added to the batch-edit whitelist unless the spec says ``batchable = False``.

    Returns ``{our name: the name that selects it}`` — ``X``, or ``X-core`` where EasyEdit keeps its own ``X``.
    Raises ``RuntimeError`` when EasyEdit cannot be imported, or when a name we need holds someone else's method.
    """
    module, why = _import_easyeditor()
    if module is None:
        raise RuntimeError(f"cannot register with EasyEdit: {why}")
    specs = _method_specs(methods)
    alg_dict, _batch_editor, state = _host()
    chosen: dict[str, str] = {}
    for spec in specs:
        name, core = accepted_alg_names(spec.name)
        foreign = name in alg_dict and not state.owns(alg_dict, name)
        if core in alg_dict and not state.owns(alg_dict, core):
            raise RuntimeError(f"EasyEdit already has a method called {core!r}; cannot register ours under it")
        names = [core]
        if replace and foreign:
            logger.warning("replacing EasyEdit's own %r with mose_easyedit's (register(replace=True))", name)
            state.displaced.setdefault(name, alg_dict[name])
            names.insert(0, name)
        elif not foreign:
            names.insert(0, name)
        for alg_name in names:
            alg_dict[alg_name] = spec.apply
            state.registered[alg_name] = spec.apply
            if getattr(spec, "batchable", True):
                state.batchable.add(alg_name)
            else:
                state.batchable.discard(alg_name)
        chosen[spec.name] = names[0]
    logger.debug("registered with EasyEdit: %s", chosen)
    return chosen


def unregister(methods=None) -> list[str]:
    """Undo :func:`register` for ``methods`` (default: all we registered); returns the EasyEdit names removed.

    Names that ``replace=True`` took get EasyEdit's own method back. Does nothing if EasyEdit was never imported.
    """
    if "easyeditor" not in sys.modules:
        return []
    alg_dict, _batch_editor, state = _host(install=False)
    if state is None:
        return []
    if methods is None:
        wanted = set(state.registered)
    else:
        wanted = {alg for spec in _method_specs(methods) for alg in accepted_alg_names(spec.name)}
    removed = []
    for alg_name in sorted(wanted & set(state.registered)):
        displaced = state.displaced.pop(alg_name, None)
        if state.owns(alg_dict, alg_name):  # else someone else has put their method there since: leave it
            if displaced is not None:
                alg_dict[alg_name] = displaced
            else:
                del alg_dict[alg_name]
            removed.append(alg_name)
        del state.registered[alg_name]
        state.batchable.discard(alg_name)
    return removed


def registered_names() -> dict[str, Callable]:
    """``{EasyEdit name: our function}`` for every name this plugin currently holds in ``ALG_DICT``."""
    if "easyeditor" not in sys.modules:
        return {}
    alg_dict, _batch_editor, state = _host(install=False)
    if state is None:
        return {}
    return {name: fn for name, fn in state.registered.items() if state.owns(alg_dict, name)}


# ------------------------------------------------------------------------------------------- auto-registration
def _register_quietly() -> None:
    try:
        chosen = register()
    except Exception as exc:  # never break the user's import of either package
        logger.warning("could not register mose_easyedit's methods with EasyEdit: %s", exc)
    else:
        logger.info("mose_easyedit methods available in EasyEdit as %s", sorted(chosen.values()))


class _RegisteringLoader(importlib.abc.Loader):
    """Runs the real loader of ``easyeditor``, then registers; everything else is delegated."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _register_quietly()

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _RegisterAfterEasyEditImport(importlib.abc.MetaPathFinder):
    """A one-shot import hook: when ``easyeditor`` is imported, register right after its ``__init__`` ran."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "easyeditor":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)  # one shot; also keeps find_spec below from finding us again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            sys.meta_path.insert(0, self)  # not there yet: keep waiting for a later import
            return None
        spec.loader = _RegisteringLoader(spec.loader)
        return spec


def autoregister() -> None:
    """Register now if EasyEdit is imported, else as soon as it is; cheap, never raises, never imports EasyEdit.

    Called by ``import mose_easyedit``, so importing this package before or after ``easyeditor`` both work; it
    also puts the ``EASYEDIT_PATH`` checkout on ``sys.path``.
    """
    checkout_on_path()
    module = sys.modules.get("easyeditor")
    if module is not None and not getattr(getattr(module, "__spec__", None), "_initializing", False):
        _register_quietly()
        return
    if not any(isinstance(finder, _RegisterAfterEasyEditImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterEasyEditImport())
