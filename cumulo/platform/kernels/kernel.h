// A kernel's arguments, declared once. Every kernel is one C function `int64_t name(const int64_t* args)`: its
// arguments in one int64 array, pointers as integers and floats as their fp32 bit patterns. Python builds that
// array by argument name (cumulo.platform.kernels.abi) and passes it to an eager call, or keeps it in a decode
// graph, which calls the same function later (graph.cpp): one entry point, one array, two uses.
//
//   #define CUMULO_RMS_NORM(X) X(const void*, x) X(const void*, w) X(void*, y) X(int64_t, rows) ...
//   CUMULO_KERNEL(cumulo_rms_norm, CUMULO_RMS_NORM) { ... a.x, a.rows ...; return 0; }
//
// From the one list of (C type, name) entries the macro generates the struct the body reads (`a`), the entry
// point that fills it from the array in list order, and `<name>_signature()`, the list as text ("const void*
// x,int64_t rows,..."), which is all Python knows of the arguments: it refuses a call that misses or adds a name
// and converts each value by its C type, so an order or count slip cannot reach memory. The body returns 0, or a
// code the caller maps to its error (a decode graph stops at the first). C types: pointers, int64_t, int, float.
#pragma once

#include <stdint.h>
#include <string.h>

#include <type_traits>

namespace cumulo_kernel {

template <typename T>
inline T arg(int64_t v) {
    if constexpr (std::is_pointer_v<T>) {
        return (T)(intptr_t)v;
    } else if constexpr (std::is_same_v<T, float>) {
        const uint32_t u = (uint32_t)v;
        float f;
        memcpy(&f, &u, 4);
        return f;
    } else {
        static_assert(std::is_same_v<T, int64_t> || std::is_same_v<T, int>, "arguments: pointers, ints, float");
        return (T)v;
    }
}

}  // namespace cumulo_kernel

#define CUMULO_KERNEL_FIELD(T, n) T n;
#define CUMULO_KERNEL_READ(T, n) a.n = cumulo_kernel::arg<T>(p[i++]);
#define CUMULO_KERNEL_TEXT(T, n) #T " " #n ","

// The arguments' struct alone (for a kernel whose helpers take it before the entry point is defined).
#define CUMULO_KERNEL_ARGS(name, ARGS) \
    struct name##_args {               \
        ARGS(CUMULO_KERNEL_FIELD)      \
    };

// The entry point and its signature, for a struct already declared; the body follows.
#define CUMULO_KERNEL_ENTRY(name, ARGS)                                                   \
    static int64_t name##_body(const name##_args& a);                                     \
    extern "C" int64_t name(const int64_t* p) {                                           \
        name##_args a;                                                                    \
        int i = 0;                                                                        \
        ARGS(CUMULO_KERNEL_READ)                                                          \
        (void)i;                                                                          \
        return name##_body(a);                                                            \
    }                                                                                     \
    extern "C" const char* name##_signature(void) { return "" ARGS(CUMULO_KERNEL_TEXT); } \
    static int64_t name##_body(const name##_args& a)

#define CUMULO_KERNEL(name, ARGS)  \
    CUMULO_KERNEL_ARGS(name, ARGS) \
    CUMULO_KERNEL_ENTRY(name, ARGS)
