"""Forward hooks as context managers: read or edit a module's input/output, always removed on exit.

No wrapper modules are ever inserted; hooks are plain ``register_forward_hook`` handles and ``__exit__``
removes them whether the body returned or raised.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch

from .modeling import get_module


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early once everything needed has been recorded."""


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output, value):
    if isinstance(output, tuple):
        return (value,) + tuple(output[1:])
    return value


class Trace(contextlib.AbstractContextManager):
    """Hook one module. ``retain_input``/``retain_output`` keep its first input / (first) output tensor;
    ``edit_output(tensor) -> tensor`` replaces the output; ``stop`` raises :class:`StopForward` after it ran."""

    def __init__(self, model, name: str, retain_input: bool = False, retain_output: bool = False,
                 edit_output: Callable[[torch.Tensor], torch.Tensor] | None = None, stop: bool = False,
                 detach: bool = True):
        self.name = name
        self.input = None
        self.output = None
        module = get_module(model, name)

        def hook(_module, inputs, output):
            if retain_input:
                value = inputs[0] if inputs else None
                self.input = value.detach() if (detach and value is not None) else value
            if edit_output is not None:
                output = _replace_first(output, edit_output(_first(output)))
            if retain_output:
                value = _first(output)
                self.output = value.detach() if detach else value
            if stop:
                raise StopForward()
            return output

        self._handle = module.register_forward_hook(hook)

    def close(self):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return exc_type is StopForward


class TraceDict(dict, contextlib.AbstractContextManager):
    """Several :class:`Trace` objects keyed by module name; ``stop`` ends the forward after the last listed
    module that actually runs last in the network (pass ``stop_at`` to name it)."""

    def __init__(self, model, names: Iterable[str], retain_input: bool = False, retain_output: bool = False,
                 edit_output: Callable[[torch.Tensor, str], torch.Tensor] | None = None,
                 stop_at: str | None = None, detach: bool = True):
        super().__init__()
        try:
            for name in dict.fromkeys(names):
                editor = (lambda t, _n=name: edit_output(t, _n)) if edit_output is not None else None
                self[name] = Trace(model, name, retain_input, retain_output, editor, stop=(name == stop_at),
                                   detach=detach)
            if stop_at is not None and stop_at not in self:
                self[stop_at] = Trace(model, stop_at, stop=True)
        except BaseException:
            self.close()
            raise

    def close(self):
        for trace in self.values():
            trace.close()

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return exc_type is StopForward
