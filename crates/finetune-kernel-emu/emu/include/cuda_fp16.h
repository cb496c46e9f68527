// cuda_fp16.h for finetune-kernel-emu: IEEE binary16 bits and their exact value as float.
#pragma once
#include <math.h>
#include <stdint.h>

struct __half_raw {
    unsigned short x;
};
struct __half {
    unsigned short __x;
    __half() = default;
    __half(__half_raw r) : __x(r.x) {}
};
inline float __half2float(__half h) {
    int sign = (h.__x >> 15) & 1, exp = (h.__x >> 10) & 31, mant = h.__x & 1023;
    float v;
    if (exp == 0) v = ldexpf((float)mant, -24);
    else if (exp == 31) v = mant ? NAN : INFINITY;
    else v = ldexpf((float)(mant | 1024), exp - 25);
    return sign ? -v : v;
}
