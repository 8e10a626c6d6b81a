/* The portable scalar path of quant_matmul_impl.h on any CPU: the tests check the SIMD build against
 * it bit for bit (AVX2). Production code loads quant_matmul.c. */
#define CHORAL_QUANT_SCALAR 1
#include "quant_matmul_impl.h"
