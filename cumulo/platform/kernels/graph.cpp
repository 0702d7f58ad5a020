// The CPU decode graph (cumulo.platform.kernels.graph): one decode step replayed as a list of kernel calls.
//
// Each op is a C function taking one int64 array of arguments (pointers as integers), recorded once per batch
// size with fixed buffers; `cumulo_graph_run` calls them in order, so a step of a 30-layer model costs one
// ctypes call instead of some 300 Python-level calls and as many small torch operators. Kernels that can fail
// (a slot or position out of range) write their code to the status word and the run stops there.
// Also the one small operator the graph needs that no other kernel file has: SiLU(gate) * up.

#include <math.h>
#include <stdint.h>

#include "bf16.h"

namespace {

using cumulo_bf16::load;
using cumulo_bf16::store;

typedef void (*OpFn)(const int64_t*);

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

extern "C" {

// ops: n pairs (function, argument array); status: the word ops write a failure code to (read after each op).
// Returns 0, or the failing op's index + 1.
int64_t cumulo_graph_run(const int64_t* ops, int64_t n, const int64_t* status) {
    for (int64_t i = 0; i < n; ++i) {
        ((OpFn)ops[2 * i])((const int64_t*)ops[2 * i + 1]);
        if (*status) return i + 1;
    }
    return 0;
}

// a = {gate_up [rows, 2 * inter], act [rows, inter], rows, inter, bf16}
void cumulo_silu_mul_op(const int64_t* a) {
    if (a[4]) silu_mul((const uint16_t*)a[0], (uint16_t*)a[1], a[2], a[3]);
    else silu_mul((const float*)a[0], (float*)a[1], a[2], a[3]);
}

}  // extern "C"
