// Argument checks for the fastres._C ops. Each message starts with the op and
// names the argument, e.g. "bn_relu_forward: out must have shape [2, 3, 7, 7]
// (like x), got [2, 3, 7, 6]". Dtype problems raise TypeError, the rest
// ValueError.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <string>

namespace fastres {

// Stride of the merged H*W axis of a 4-D tensor, or -1 when H and W cannot be
// merged into one strided axis (torch strides are never negative).
inline int64_t merged_hw_stride(const at::Tensor& t) {
  const int64_t h = t.size(2), w = t.size(3);
  if (w == 1) return t.stride(2);
  if (h == 1) return t.stride(3);
  return t.stride(2) == w * t.stride(3) ? t.stride(3) : -1;
}

// torch's Python name of a dtype ("float32", "int64"), which is what users pass.
inline std::string dtype_name(at::ScalarType dtype) {
  return std::string(c10::getDtypeNames(dtype).first);
}

}  // namespace fastres

#define FASTRES_CHECK_DIM(op, name, t, ndim)                                            \
  TORCH_CHECK_VALUE((t).dim() == (ndim), op, ": ", name, " must be ", ndim, "-D, got ", \
                    (t).dim(), "-D of shape ", (t).sizes())

#define FASTRES_CHECK_DTYPE(op, name, t, dtype)                                         \
  TORCH_CHECK_TYPE((t).scalar_type() == (dtype), op, ": ", name, " must have dtype ",   \
                   ::fastres::dtype_name(dtype), ", got ",                              \
                   ::fastres::dtype_name((t).scalar_type()))

// t has exactly the shape `expected`; `like` says where that shape comes from.
#define FASTRES_CHECK_SHAPE(op, name, t, expected, like)                                \
  TORCH_CHECK_VALUE((t).sizes() == (expected), op, ": ", name, " must have shape ",     \
                    (expected), " (", like, "), got ", (t).sizes())

#define FASTRES_CHECK_SAME_DEVICE(op, name, t, ref_name, ref)                           \
  TORCH_CHECK_VALUE((t).device() == (ref).device(), op, ": ", name,                     \
                    " must be on the same device as ", ref_name, " (",                  \
                    (ref).device(), "), got ", (t).device())

#define FASTRES_CHECK_MERGEABLE(op, name, t)                                            \
  TORCH_CHECK_VALUE(::fastres::merged_hw_stride(t) >= 0, op, ": ", name,                \
                    " must have H and W mergeable into one strided axis "               \
                    "(stride(2) == size(3) * stride(3)), got shape ", (t).sizes(),      \
                    " and strides ", (t).strides())

// Written tensors: an expanded (self-overlapping) tensor would race with itself.
#define FASTRES_CHECK_NO_OVERLAP(op, name, t)                                           \
  TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, op, ": ",       \
                    name, " is written, so it must not overlap itself "                 \
                    "(expanded?), got strides ", (t).strides())
