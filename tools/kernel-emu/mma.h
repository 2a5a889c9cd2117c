// Stand-in for CUDA's mma.h (nvcuda::wmma) when a kernel is compiled by the emulator (see README.md).
#pragma once
#include "cuda_shim.h"
