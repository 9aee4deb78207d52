"""What importing megatron-core costs every process, and the two parts of it cut on CPU.

Measured on the 2-core CI machine: ``import megatron.core`` takes 2.8 s after torch's 1.4 s,
and a process that imported it spends another 1.0 s at exit. Every process pays this: each
torchrun rank, each ``sami-convert`` or ``sami-train`` call, each test that launches a CLI.

- 1.6 s of the import is megatron-core applying ``torch.compile`` as a decorator while its
  modules load (the fused bias-GeLU/SwiGLU kernels, the MoE router's top-k, ``jit_fuser``).
  Building those wrappers imports ``torch._dynamo`` and ``torch._inductor``; the compilation
  itself waits for each function's first call anyway. On a machine without CUDA the megatron
  modules therefore see a ``torch.compile`` that defers building the wrapper to that first
  call (:func:`deferred_compile`). The CPU lane calls none of these functions (its fusions are
  off), and one that is called is compiled exactly as before. On a GPU nothing changes.
- 0.9 s of the exit is the interpreter's last garbage collections walking the few million
  objects these imports create. When the interpreter starts to shut down (an atexit handler)
  those objects are frozen (``gc.freeze``), so the collections skip them; they are freed by
  reference counting as modules are torn down, as before.

The finder also stops a megatron-core import that a broken Transformer Engine would end with
TE's own traceback, with one sentence instead (:func:`broken_transformer_engine`).

:func:`install` (called by the package's ``__init__``, so it precedes any megatron import)
puts a finder in front of ``sys.meta_path`` that does both when megatron-core is first
imported. It imports nothing itself until then.
"""

from __future__ import annotations

import atexit
import functools
import gc
import importlib.abc
import importlib.util
import sys
from collections.abc import Callable
from typing import Any

from megatron_sami.errors import BrokenDependencyError

# The megatron-core modules a process that runs models imports (the seam's), for a fork server
# to import once so that each forked rank starts with them loaded (testing.multiprocess).
PRELOAD_MODULES = ("megatron.core", "megatron.core.models.gpt", "megatron.core.optimizer",
                   "megatron.core.dist_checkpointing")


def deferred_compile(compile_fn: Callable) -> Callable:
    """A stand-in for ``compile_fn`` (``torch.compile``) that calls it at the first use of each
    decorated function instead of at decoration. Takes the same arguments."""

    def compile_later(model: Callable | None = None, **options: Any) -> Callable:
        if model is None:
            return lambda fn: compile_later(fn, **options)
        compiled: Callable | None = None

        @functools.wraps(model)
        def call(*args: Any, **kwargs: Any) -> Any:
            nonlocal compiled
            if compiled is None:
                compiled = compile_fn(model, **options)
            return compiled(*args, **kwargs)

        return call

    return compile_later


def _is_megatron(name: str) -> bool:
    return name == "megatron" or name.startswith("megatron.")


class _MegatronImportFinder(importlib.abc.MetaPathFinder):
    """Finds megatron modules through the other finders and wraps how they are executed."""

    def __init__(self) -> None:
        self._first_import_seen = False
        self._compile_stand_in: Callable | None = None
        self._transformer_engine_problem: str | None = None

    def find_spec(self, name: str, path: Any = None, target: Any = None):
        if not _is_megatron(name):
            return None
        spec = self._spec_from_other_finders(name, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        if not self._first_import_seen:
            self._on_first_import()
        if self._transformer_engine_problem is not None:  # every megatron import: one sentence, not TE's traceback
            raise BrokenDependencyError(self._transformer_engine_problem)
        if self._compile_stand_in is not None:
            spec.loader.exec_module = self._executing_with(self._compile_stand_in, spec.loader.exec_module)
        return spec

    def _spec_from_other_finders(self, name: str, path: Any, target: Any):
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                return spec
        return None

    def _on_first_import(self) -> None:
        import torch

        self._first_import_seen = True
        self._transformer_engine_problem = broken_transformer_engine()
        if not torch.cuda.is_available():
            self._compile_stand_in = deferred_compile(torch.compile)
        atexit.register(gc.freeze)

    @staticmethod
    def _executing_with(compile_stand_in: Callable, exec_module: Callable) -> Callable:
        """``exec_module`` with ``torch.compile`` replaced while the module's body runs (what it
        imports runs under the stand-in too; a nested megatron module restores the outer one's)."""

        def execute(module) -> None:
            import torch

            saved = torch.compile
            torch.compile = compile_stand_in
            try:
                exec_module(module)
            finally:
                torch.compile = saved

        return execute


def broken_transformer_engine() -> str | None:
    """Why megatron-core cannot be imported with the Transformer Engine installed here, or None
    (TE absent, or TE whose PyTorch part imports).

    megatron-core 0.19.2 imports TE in many modules and does not survive a TE whose top-level
    package imports but whose PyTorch extension does not (TE installed without ``[pytorch]``, or
    built against another torch: "undefined symbol"): ``fp8_utils.py`` imports
    ``transformer_engine.pytorch.tensor`` whenever ``import transformer_engine`` succeeds, and
    ``tensor_parallel/random.py`` catches only ``ModuleNotFoundError``; ``import megatron.core``
    then ends with TE's traceback.
    """
    if importlib.util.find_spec("transformer_engine") is None:
        return None
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as err:  # noqa: BLE001 - ImportError, OSError or RuntimeError from its extension
        return (f"Transformer Engine is installed but `import transformer_engine.pytorch` fails "
                f"({type(err).__name__}: {str(err)[:300]}), and megatron-core cannot be imported with it: "
                "install Transformer Engine built for this torch (in an NGC container keep the container's "
                "torch: pip install --no-deps -e .), or uninstall it to run without TE.")
    return None


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once per process)."""
    if not any(isinstance(finder, _MegatronImportFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MegatronImportFinder())
