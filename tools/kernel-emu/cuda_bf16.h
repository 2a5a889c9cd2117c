// Stand-in for CUDA's cuda_bf16.h when a kernel is compiled by the emulator (see README.md).
#pragma once
#include "cuda_shim.h"
