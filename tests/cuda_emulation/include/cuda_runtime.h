// Stand-in for <cuda_runtime.h> in the CPU emulation (see emu.h).
#pragma once
#include "emu.h"
