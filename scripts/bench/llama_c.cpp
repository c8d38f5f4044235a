// Speed anchor for the llama.cpp engine: the same vendored llama.cpp sources (llama-cpp-sys-2's), built with the
// same CPU flags, driven directly through llama.h without Rust: prefill the prompt ids in 512-token batches,
// then greedy-decode N tokens one at a time (what `jemma bench` does on a GGUF). One warm-up run (its tokens
// are printed), then RUNS timed runs (default 1) on a cleared cache, as `jemma bench` times its engine; prints
// one JSON object with the medians.
// usage: llama_c MODEL.gguf IDS(comma-separated) N_GEN THREADS [RUNS]
#include "llama.h"
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>
#include <algorithm>

static double now() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

int main(int argc, char ** argv) {
    if (argc != 5 && argc != 6) { fprintf(stderr, "usage: %s MODEL IDS N_GEN THREADS [RUNS]\n", argv[0]); return 2; }
    std::vector<llama_token> ids;
    std::stringstream ss(argv[2]);
    for (std::string t; std::getline(ss, t, ',');) ids.push_back(std::atoi(t.c_str()));
    const int n_gen = std::atoi(argv[3]), threads = std::atoi(argv[4]);
    const int runs = argc == 6 ? std::max(1, std::atoi(argv[5])) : 1;
    llama_log_set([](ggml_log_level, const char *, void *) {}, nullptr);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "load failed\n"); return 1; }
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = ids.size() + n_gen + 16;
    cp.n_batch = 512;
    cp.n_ubatch = 512;
    cp.n_threads = threads;
    cp.n_threads_batch = threads;
    llama_context * ctx = llama_init_from_model(model, cp);
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    llama_batch batch = llama_batch_init(512, 0, 1);
    std::vector<int> out;
    // One run from an empty cache: prefill and decode rates (tokens/s); its greedy tokens in `out`.
    auto run = [&](double & prefill_tps, double & decode_tps) -> bool {
        llama_memory_clear(llama_get_memory(ctx), true);
        out.clear();
        double t0 = now();
        for (size_t start = 0; start < ids.size(); start += 512) {
            batch.n_tokens = 0;
            for (size_t i = start; i < ids.size() && i < start + 512; i++) {
                batch.token[batch.n_tokens] = ids[i];
                batch.pos[batch.n_tokens] = i;
                batch.n_seq_id[batch.n_tokens] = 1;
                batch.seq_id[batch.n_tokens][0] = 0;
                batch.logits[batch.n_tokens] = i == ids.size() - 1;
                batch.n_tokens++;
            }
            if (llama_decode(ctx, batch)) { fprintf(stderr, "decode failed\n"); return false; }
        }
        double prefill = now() - t0;
        auto argmax = [&](int i) {
            const float * l = llama_get_logits_ith(ctx, i);
            int best = 0;
            for (int v = 1; v < n_vocab; v++) if (l[v] > l[best]) best = v;
            return best;
        };
        int tok = argmax(batch.n_tokens - 1);
        out.push_back(tok);
        int pos = ids.size();
        double t1 = now();
        for (int k = 1; k < n_gen; k++) {
            batch.n_tokens = 1;
            batch.token[0] = tok;
            batch.pos[0] = pos++;
            batch.n_seq_id[0] = 1;
            batch.seq_id[0][0] = 0;
            batch.logits[0] = 1;
            if (llama_decode(ctx, batch)) { fprintf(stderr, "decode failed\n"); return false; }
            tok = argmax(0);
            out.push_back(tok);
        }
        double decode = now() - t1;
        prefill_tps = ids.size() / prefill;
        decode_tps = (n_gen - 1) / decode;
        return true;
    };
    double p = 0, d = 0;
    if (!run(p, d)) return 1;
    const std::vector<int> tokens = out;
    std::vector<double> ps, ds;
    for (int r = 0; r < runs; r++) {
        if (!run(p, d)) return 1;
        ps.push_back(p);
        ds.push_back(d);
    }
    std::sort(ps.begin(), ps.end());
    std::sort(ds.begin(), ds.end());
    printf("{\"prefill_tps\": %f, \"decode_tps\": %f, \"version\": \"llama.cpp (llama-cpp-sys-2 sources, C API)\", \"tokens\": [",
           ps[ps.size() / 2], ds[ds.size() / 2]);
    for (size_t i = 0; i < tokens.size(); i++) printf("%s%d", i ? "," : "", tokens[i]);
    printf("]}\n");
    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
