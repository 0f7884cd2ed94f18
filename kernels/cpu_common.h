/* What cpu_gemv.c and cpu_decode.c (one library) both need: bf16 <-> fp32 as torch does them. */
#ifndef MINILLM_CPU_COMMON_H
#define MINILLM_CPU_COMMON_H
#include <stdint.h>
#include <string.h>

static inline float bf16_f32(uint16_t h) {   /* bf16 is the top half of an fp32 */
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_bf16(float f) {   /* round to nearest even, as torch's .to(bfloat16) */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 64);   /* NaN stays NaN */
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}
#endif
