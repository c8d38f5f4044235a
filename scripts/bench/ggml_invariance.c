// Is llama.cpp's CPU matrix product batch-invariant? For each weight type, W·x is computed with x as one
// column of an n-column batch (n = 1 ... 512, the same vectors in every batch) and compared, bit for bit,
// with the lone product (n = 1) and with the two-column one (n = 2). A row count where the results change
// is where ggml takes another kernel (llamafile's tinyBLAS from 2 columns, the tiled K-quant kernel from
// 8), whose sums round differently: a sequence decoded beside others then differs in its last bits from
// its lone decode. Built and run by scripts/bench-invariance against the engine's own ggml; prints one
// line per type: "n=N:A/B", A rows (of 512) differing from n = 1 and B from n = 2, for column 0 and 1.
// ggml's plain path only: llama.cpp's loader also repacks some types for the CPU (on AVX2 Q4_0, Q4_K,
// IQ4_NL, MXFP4; ggml_repack_get_optimal_repack_type), whose own kernels this does not reach.
#include "ggml.h"
#include "ggml-cpu.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static float frand(void) { return (float)rand() / RAND_MAX * 2.f - 1.f; }

// W (M rows of K, quantized to `type` from wf) times the first n columns of x; returns M x n floats.
static float *product(enum ggml_type type, const float *wf, int K, int M, const float *x, int n) {
    struct ggml_init_params p = {512ull << 20, NULL, false};
    struct ggml_context *ctx = ggml_init(p);
    struct ggml_tensor *w = ggml_new_tensor_2d(ctx, type, K, M);
    if (type == GGML_TYPE_F32) {
        memcpy(w->data, wf, 4ull * K * M);
    } else {
        ggml_quantize_chunk(type, wf, w->data, 0, M, K, NULL);
    }
    struct ggml_tensor *xt = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, K, n);
    memcpy(xt->data, x, 4ull * K * n);
    struct ggml_tensor *y = ggml_mul_mat(ctx, w, xt);
    struct ggml_cgraph *g = ggml_new_graph(ctx);
    ggml_build_forward_expand(g, y);
    ggml_graph_compute_with_ctx(ctx, g, 2);
    float *out = malloc(4ull * M * n);
    memcpy(out, y->data, 4ull * M * n);
    ggml_free(ctx);
    return out;
}

int main(void) {
    const enum ggml_type types[] = {GGML_TYPE_Q8_0, GGML_TYPE_Q4_0, GGML_TYPE_Q4_1, GGML_TYPE_Q5_0,
                                    GGML_TYPE_Q5_1, GGML_TYPE_MXFP4, GGML_TYPE_IQ4_NL, GGML_TYPE_IQ4_XS,
                                    GGML_TYPE_Q2_K, GGML_TYPE_Q3_K, GGML_TYPE_Q4_K, GGML_TYPE_Q5_K,
                                    GGML_TYPE_Q6_K, GGML_TYPE_BF16, GGML_TYPE_F16, GGML_TYPE_F32};
    const int ns[] = {1, 2, 3, 4, 7, 8, 9, 16, 31, 64, 200, 512};
    const int K = 1024, M = 512, NMAX = 512;
    for (size_t t = 0; t < sizeof types / sizeof *types; t++) {
        float *wf = malloc(4ull * K * M);
        srand(1);
        for (long i = 0; i < (long)K * M; i++) wf[i] = frand() * 0.05f;
        float *x = malloc(4ull * K * NMAX);
        for (long i = 0; i < (long)K * NMAX; i++) x[i] = frand();
        float *one = product(types[t], wf, K, M, x, 1), *two = product(types[t], wf, K, M, x, 2);
        printf("%-7s", ggml_type_name(types[t]));
        for (size_t a = 0; a < sizeof ns / sizeof *ns; a++) {
            int n = ns[a], d1 = 0, d2 = 0;
            float *y = product(types[t], wf, K, M, x, n);
            for (int i = 0; i < M; i++) {
                d1 += y[i] != one[i];
                d2 += n >= 2 && y[M + i] != two[M + i];
            }
            printf(" n=%d:%d/%d", n, d1, d2);
            free(y);
        }
        printf("\n");
        free(one), free(two), free(wf), free(x);
    }
    return 0;
}
