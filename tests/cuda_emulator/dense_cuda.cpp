// csrc/dense_cuda.cu, compiled by the host compiler against the CUDA emulator
// in include/ (its kernels run on CPU memory): the emulated build of
// fastres._C that tests/emulated_cuda.py makes.
#include "../../csrc/dense_cuda.cu"
