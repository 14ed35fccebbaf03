"""Fixes to Triton 3.6's interpreter so that kernels run there compute what they compute on a GPU.

Applied once by ``fastres.testing.patch_triton_interpreter`` (which
``gpu_paths_on_cpu()`` calls): the interpreter truncates float32 -> bfloat16
casts, multiplies bfloat16 dot operands as bit patterns, checks int32
overflow on every integer operation (slow, and compiled kernels do not), and
converts one-element blocks to indices in a way numpy 2.5 refuses.
"""

import functools

import torch


def _round_bfloat16_to_nearest_in_interpreter() -> None:
    """Make Triton's interpreter round float32 -> bfloat16 to nearest even, as GPUs do.

    Triton 3.6's interpreter truncates that cast, a bias that errors of
    bf16 results then accumulate, which no GPU run has.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    cast_impl = interpreter.InterpreterBuilder.cast_impl

    def rounding_cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return cast_impl(self, src, dst_type)

    interpreter.InterpreterBuilder.cast_impl = rounding_cast_impl


def _bfloat16_dot_in_interpreter() -> None:
    """Make Triton's interpreter multiply bfloat16 ``tl.dot`` operands as numbers.

    Triton 3.6's interpreter keeps bfloat16 as uint16 bit patterns and hands
    them to ``np.matmul`` as they are (it converts only fp8), which multiplies
    the bit patterns. Here they are widened to float32 first, exactly, as a
    GPU's tensor cores multiply them.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    create_dot = interpreter.InterpreterBuilder.create_dot

    def widening_create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        def widen(h):
            if h.dtype.scalar != tl.bfloat16:
                return h
            bits = np.ascontiguousarray(h.data).astype(np.uint32) << 16
            return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

        return create_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = widening_create_dot


def _no_overflow_checks_in_interpreter() -> None:
    """Turn off the interpreter's int32 overflow check on every integer add and multiply.

    It costs about 40% of the interpreter's time in the convolution kernels'
    index arithmetic and can only fire on offsets past 2**31, which the tests'
    tensors never reach; compiled kernels do not check either.
    """
    import dataclasses

    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    builder.options = dataclasses.replace(builder.options, sanitize_overflow=False)


def _index_one_element_arrays_in_interpreter() -> None:
    """Make Triton's interpreter take a one-element block as an index through ``.item()``.

    Triton 3.6's interpreter converts a scalar (held as a one-element numpy
    array) to an index with ``int(array)``, which numpy 2.5 refuses for
    arrays of ndim > 0 (older numpy warned).
    """
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patch_tensor_with_item_index(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patch_tensor_with_item_index


@functools.cache
def patch() -> None:
    """Apply every fix, once; nothing without Triton."""
    try:
        _index_one_element_arrays_in_interpreter()
        _round_bfloat16_to_nearest_in_interpreter()
        _bfloat16_dot_in_interpreter()
        _no_overflow_checks_in_interpreter()
    except ImportError:  # no Triton: only the eager paths run
        pass
