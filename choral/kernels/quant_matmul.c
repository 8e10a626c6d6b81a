/* Quantized-weight projections, the CPU's fastest path (quant_matmul_impl.h has the kernel). */
#include "quant_matmul_impl.h"
