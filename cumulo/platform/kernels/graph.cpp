// The CPU decode graph (cumulo.platform.kernels.graph): one decode step replayed as a list of kernel calls.
//
// Each op is a kernel's entry point and its int64 argument array (kernel.h), the same call an eager use makes,
// recorded once per batch size over fixed buffers; `cumulo_graph_run` calls them in order, so a step of a
// 30-layer model costs one ctypes call instead of some 300 Python-level calls and as many small torch
// operators. A kernel that fails (a slot or position out of range) returns its code and the run stops there.
// Also the one small operator the graph needs that no other kernel file has: SiLU(gate) * up.

#include <math.h>
#include <stdint.h>

#include "bf16.h"
#include "kernel.h"

namespace {

using cumulo_bf16::load;
using cumulo_bf16::store;

typedef int64_t (*KernelFn)(const int64_t*);  // every kernel's entry point (kernel.h)

// act = silu(gate) * up over rows of [gate | up], each result rounded to T as torch's two operators round it.
template <typename T>
void silu_mul(const T* gu, T* act, int64_t rows, int64_t inter) {
    for (int64_t r = 0; r < rows; ++r) {
        const T* g = gu + r * 2 * inter;
        const T* u = g + inter;
        T* o = act + r * inter;
        for (int64_t i = 0; i < inter; ++i) {
            const float x = load(g, i);
            T s[1];
            store(s, 0, x / (1.0f + expf(-x)));
            store(o, i, load(s, 0) * load(u, i));
        }
    }
}

}  // namespace

// ops: n pairs (kernel, argument array). Each kernel returns 0 or an error code; the first code stops the run and
// is written to *status. Returns 0, or the failing op's index + 1.
#define CUMULO_GRAPH_RUN(X) X(const int64_t*, ops) X(int64_t, n) X(int64_t*, status)
CUMULO_KERNEL(cumulo_graph_run, CUMULO_GRAPH_RUN) {
    for (int64_t i = 0; i < a.n; ++i) {
        const int64_t code = ((KernelFn)a.ops[2 * i])((const int64_t*)a.ops[2 * i + 1]);
        if (code) {
            *a.status = code;
            return i + 1;
        }
    }
    return 0;
}

// act [rows, inter] = silu(gate) * up, gate_up [rows, 2 * inter]; bf16 = 1: bf16 bits, else fp32.
#define CUMULO_SILU_MUL(X) X(const void*, gate_up) X(void*, act) X(int64_t, rows) X(int64_t, inter) X(int, bf16)
CUMULO_KERNEL(cumulo_silu_mul, CUMULO_SILU_MUL) {
    if (a.bf16) silu_mul((const uint16_t*)a.gate_up, (uint16_t*)a.act, a.rows, a.inter);
    else silu_mul((const float*)a.gate_up, (float*)a.act, a.rows, a.inter);
    return 0;
}
