// The CPU-feature probe as Python asks it (cumulo.platform.kernels.features): built with portable flags, so it
// answers on any CPU before a kernel needing more is built.

#include "cpu_features.h"

extern "C" int64_t cumulo_cpu_features(void) { return cumulo_cpu::probe(); }
