"""Bounds on what a pickle may build before it builds it: how deep its objects nest, and how much memory the few
callables a CIFAR file may name can ask for.

The restricted unpickler (`cifar_files`) already refuses every callable that could run a command; what remains is
memory and the C stack. `builtins.bytearray(2**31)` is one small opcode that zero-fills 2 GiB, `numpy.ndarray` called
with zero strides makes a view of one byte that the first copy turns into gigabytes, a codec applied to its own output
doubles it each time, and a tuple nested 200,000 deep crashes the interpreter when it is hashed as a dict key. So the
file is first read opcode by opcode (no object built) to bound nesting and every declared size, and the admitted
callables are replaced by guards that build only what numpy and Python themselves write into a pickle.
"""

from __future__ import annotations

import io
import pickletools
from collections.abc import Callable
from typing import Any

import numpy as np

MAX_NESTING = 64  # levels: a CIFAR file's dict -> list -> array state needs under 10
# Opcodes that return their first operand (a container filled or an object given its state), not a new level.
_KEEPS_FIRST = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD", "MEMOIZE", "READONLY_BUFFER"}


class Refused(ValueError):
    """A pickle asks for more than a CIFAR file ever needs; the message says what, in one clause."""


def _pop_operands(stack: list[int], marks: list[int], before: list[Any]) -> list[int]:
    """Take an opcode's operands (their nesting depths) off the simulated stack."""
    popped: list[int] = []
    count = len(before)
    if pickletools.markobject in before:
        if not marks:
            raise Refused("it uses a mark it never set")
        start = marks.pop()
        popped, stack[start:] = stack[start:], []
        count = before.index(pickletools.markobject)
    if count > len(stack):
        raise Refused("it takes more from its stack than it put there")
    if count:
        popped, stack[-count:] = stack[-count:] + popped, []
    return popped


def deepest_nesting(content: bytes) -> int:
    """How deep the objects `content` would build nest, read from its opcodes without building any (every length
    it declares is checked against the bytes there: `pickletools` reads them from an in-memory copy)."""
    stack: list[int] = []
    marks: list[int] = []
    memo: dict[Any, int] = {}
    deepest = 0
    try:
        for opcode, argument, _ in pickletools.genops(io.BytesIO(content)):
            name = opcode.name
            if name == "MARK":
                marks.append(len(stack))
            elif name.endswith("GET"):
                stack.append(memo.get(argument, 0))
            elif name.endswith("PUT") or name == "MEMOIZE":
                memo[argument if name.endswith("PUT") else len(memo)] = stack[-1] if stack else 0
            elif name == "DUP":
                stack.extend(stack[-1:])
            else:
                operands = _pop_operands(stack, marks, opcode.stack_before)
                if name in _KEEPS_FIRST and operands:
                    depth = max(operands[0], 1 + max(operands[1:], default=-1))
                else:
                    depth = 1 + max(operands, default=-1)
                stack.extend([depth] * len(opcode.stack_after))
                deepest = max(deepest, depth)
            if deepest > MAX_NESTING:
                raise Refused(f"its objects nest more than {MAX_NESTING} levels deep")
    except ValueError as error:  # pickletools' word for a length past the end or an unknown opcode
        raise error if isinstance(error, Refused) else Refused(f"it is not a whole pickle ({error})") from None
    return deepest


class NdarrayName:
    """Stands for `numpy.ndarray` where a pickle names it: numpy's own pickles pass the class to `_reconstruct`
    and never call it, and calling it is how a zero-stride view of one byte poses as gigabytes."""

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        raise Refused("it calls numpy.ndarray directly, which numpy's own pickles never do")


def reconstruct(original: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    """numpy's `_reconstruct`, admitted only as numpy writes it: an empty ndarray whose state then fills it (and
    numpy checks that state's bytes against its shape)."""

    def guarded(subtype: Any, shape: Any, dtype_code: Any) -> np.ndarray:
        if not isinstance(subtype, NdarrayName) or shape != (0,) or not isinstance(dtype_code, bytes):
            raise Refused("it rebuilds an array in a way numpy's own pickles never do")
        return original(np.ndarray, (0,), dtype_code)

    return guarded


def frombuffer(original: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    """numpy's `_frombuffer` (protocol 5), admitted only over bytes the file holds, filled exactly by the shape."""

    def guarded(buffer: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
        if not (isinstance(buffer, (bytes, bytearray)) and isinstance(dtype, np.dtype) and isinstance(shape, tuple)
                and all(isinstance(side, int) and side >= 0 for side in shape)
                and int(np.prod(shape, dtype=object)) * dtype.itemsize == len(buffer)):
            raise Refused("its array's shape does not match the bytes it holds")
        return original(buffer, dtype, shape, order)

    return guarded


def dtype(original: type[np.dtype]) -> Callable[..., np.dtype]:
    """numpy's `dtype`, for plain types only: an object dtype would fill an array with anything the file builds."""

    def guarded(*args: Any) -> np.dtype:
        made = original(*args)
        if made.hasobject:
            raise Refused("it holds an array of Python objects, not numbers")
        return made

    return guarded


def from_text(original: Callable[..., Any]) -> Callable[..., Any]:
    """`bytearray` and `_codecs.encode` as Python writes bytes into a pickle: text (or bytes) the file holds, at
    most re-encoded as latin-1, never a size to fill nor a codec that grows its input."""

    def guarded(*args: Any) -> Any:
        text_ok = len(args) in (1, 2) and isinstance(args[0], (str, bytes, bytearray))
        if not (text_ok and (len(args) == 1 or args[1] in ("latin1", "latin-1"))):
            raise Refused(f"it calls {original.__name__} with something other than the text it holds")
        return original(*args)

    return guarded
