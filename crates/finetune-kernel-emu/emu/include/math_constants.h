// math_constants.h for finetune-kernel-emu: the CUDART_ constants kernels/*.cu use.
#pragma once
#include <math.h>
#define CUDART_INF_F INFINITY
#define CUDART_NAN_F NAN
#define CUDART_PI_F 3.141592654f
