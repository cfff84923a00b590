"""torch.compile plumbing of the Triton launchers: the one registration helper every op file uses.

The pattern: each launcher (a host function that allocates and launches kernels) is registered as a
torch.library custom op `repae::<name>` with its schema and a fake (shape-only) kernel, and the decorator
returns a callable that is the op while torch.compile traces and the launcher itself otherwise. The
autograd.Function of each op file (the autograd hookup) calls its launchers only through these callables, so
one Function serves eager and compiled code: compiled, each launch is one opaque graph node (no graph break);
eager, there is no dispatcher overhead per launch.

Why custom_op and not torch.library.triton_op + wrap_triton: triton_op traces the launcher's host code into
the graph, which reads real data pointers under the Triton interpreter; on the CPU machine (torch 2.13,
TRITON_INTERPRET=1) both torch.library.opcheck and torch.compile(fullgraph=True) of a triton_op fail there
("Cannot access data pointer of Tensor"), so the CPU suite could not test compilation. custom_op with
register_fake works on every supported torch (2.11 on the GPU machine, 2.13 here) and under the interpreter.

A launcher registered here must be op-shaped: it returns tensors only, never None and never one of its
inputs (an op's output may not alias an input). Where a mode has no output it returns an empty placeholder
(`placeholder`: numel 0), and its caller knows from its own flags which outputs are placeholders.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch

_as_ops = False


def as_ops_on() -> bool:
    """Whether launchers are being called as their custom ops (inside `as_custom_ops()`)."""
    return _as_ops


@contextlib.contextmanager
def as_custom_ops() -> Iterator[None]:
    """Inside: every launcher is called as its repae:: op, as while torch.compile traces, and the triton backend
    accepts CPU tensors. Under torch's FakeTensorMode the ops then run their fake (shape-only) kernels, so a tool
    can trace our kernels without a GPU (the run planner, docs/PLANNING.md#how-the-planner-counts). On real CPU
    tensors without the interpreter the launch itself would fail: this is for fake tensors."""
    global _as_ops
    before, _as_ops = _as_ops, True
    try:
        yield
    finally:
        _as_ops = before


def placeholder(like: torch.Tensor) -> torch.Tensor:
    """The empty tensor an op returns for an output its mode does not produce."""
    return like.new_empty(0)


def registered_launcher(name: str, schema: str, fake: Callable, mutates_args: tuple[str, ...] = ()):
    """Decorator: register the launcher as the op repae::<name> with this schema and fake kernel; return a
    callable that runs the op while torch.compile traces and the launcher otherwise (the op is its `.op`).

    Keyword arguments of the callable are eager-only extras of the launcher outside the schema (a Python
    callable such as a stats hook cannot enter a graph); they must be None while compiling.
    """

    def register(launch: Callable) -> Callable:
        op = torch.library.custom_op(f"repae::{name}", launch, mutates_args=mutates_args, schema=schema)
        op.register_fake(fake)

        @functools.wraps(launch)
        def call(*args, **eager_only):
            if _as_ops or torch.compiler.is_compiling():
                assert all(v is None for v in eager_only.values()), f"repae::{name}: {list(eager_only)} while compiling"
                return op(*args)
            return launch(*args, **eager_only)

        call.op = op
        return call

    return register
