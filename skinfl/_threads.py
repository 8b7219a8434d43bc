"""The module each thread computes with, so that one fitted estimator serves several threads at once.

:func:`torch.func.functional_call` runs a module on other tensors than its own by putting them in the
module's place for the duration of the call and putting its own back at the end. Two threads running one
module at once see each other's tensors, and the second to finish may put back the first one's: the
module then keeps another call's (batched, gradient-tracking) tensors for good. EK-FAC's statistics hang
forward hooks on the modules, which another thread's forward pass would run too.

So each thread computes with a module of its own (:func:`thread_module`): the first thread to ask for a
module (the one that fits the estimator, or loads it) computes with the module itself; any other thread
gets a copy, made the first time it asks and kept while the thread lives. A new module (a refit) has
copies of its own. The copies share the tensors of the module's parameters and buffers, which nothing
writes to (they do not require gradients and skinfl never changes them): a copy costs the module's Python
objects, not its memory.

Copies are made from a template taken when the first thread asks, before any thread computes with the
module: a module in the middle of a call holds another call's tensors in its own's place.

torch's forward-mode differentiation (``torch.func.jvp``, ``hessian``) cannot run in two threads at once,
whatever the module: it numbers its levels in process-wide state, and a level can be left only after every
later one. Code that runs it holds :data:`FORWARD_AD`, so that threads take turns there and run together
everywhere else.
"""

from __future__ import annotations

import copy
import threading
import weakref

# {module: _ThreadModules}; an entry goes with its module.
_SHARED = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()

# Held around every use of forward-mode differentiation (see the module's docstring); reentrant, as a
# forward-mode derivative may be taken inside another.
FORWARD_AD = threading.RLock()


def thread_module(module):
    """``module`` in the thread that asked first for it, a copy of it private to the calling thread in others."""
    shared = _SHARED.get(module)
    if shared is None:
        with _LOCK:
            shared = _SHARED.get(module)
            if shared is None:
                shared = _SHARED[module] = _ThreadModules(module)
    if threading.get_ident() == shared.owner:
        return module
    return shared.private_copy()


class _ThreadModules:
    """Who computes with ``module`` itself (``owner``, a thread's id), and the other threads' copies."""

    def __init__(self, module):
        self.owner = threading.get_ident()
        self._template = _sharing_tensors(module)
        self._copies = threading.local()

    def private_copy(self):
        module = getattr(self._copies, "module", None)
        if module is None:
            module = self._copies.module = _sharing_tensors(self._template)
        return module


def _sharing_tensors(module):
    """A deep copy of ``module`` whose parameters and buffers are the same tensors as ``module``'s."""
    tensors = [*module.parameters(), *module.buffers()]
    return copy.deepcopy(module, memo={id(tensor): tensor for tensor in tensors})
