// cudasim stands in for the CUDA toolkit header of this name (tests/cudasim/include/cudasim.h).
#pragma once
#include "cudasim.h"
