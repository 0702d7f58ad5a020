// The CPU-feature probe as Python asks it (cumulo.platform.kernels.build.cpu_features): built with portable
// flags, so it answers on any CPU before a kernel needing more is built. Returns cpu_features.h's bits.

#include "cpu_features.h"
#include "kernel.h"

#define CUMULO_CPU_FEATURES(X)
CUMULO_KERNEL(cumulo_cpu_features, CUMULO_CPU_FEATURES) { return cumulo_cpu::probe(); }
