/* Exercises the C ABI (gllm_client_c.h) from plain C against a real gllm server:
 *     gllm_c_abi_test HOST PORT
 * Two requests (a prompt and a chat) stream at once; each must end with exactly one on_completed whose text
 * equals the streamed text (the chat, paced and with a first-token deadline, reports the deadline met; the prompt,
 * without one, reports none); a bad request must end with on_failed(bad_request); stats must answer. Then the
 * NPC-memory ops: the chat is snapshot and the blob restored (the same token count), a prompt is pinned and unpinned
 * (found), two identical texts and another are embedded (unit length, the identical ones equal, the other not), a
 * damaged blob ends with on_failed(bad_request). Prints "C ABI OK ..." and exits 0, or says what failed and
 * exits 1. */
#define _POSIX_C_SOURCE 200809L   /* clock_gettime, nanosleep under -std=c11 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "gllm/gllm_client_c.h"

typedef struct {
    char id[64];
    char text[4096];
    char done_text[4096];
    int ends;
    int failed;
    char code[64];
    long long completion_tokens;
    int deadline_met;
} request;

typedef struct {
    request req[3];
    int connected;
    int stats;
    int bad;
    /* NPC memory */
    int answers;                  /* answer callbacks and failures of the memory ops */
    long long snap_tokens, restored_tokens, pinned_tokens;
    unsigned char blob[1 << 16];
    size_t blob_len;
    char pin[64];
    int found;
    size_t n_vectors, dim;
    int vectors_ok;
    char op_failed_code[64];
} state;

static request* find(state* s, const char* id) {
    for (int i = 0; i < 3; i++)
        if (strcmp(s->req[i].id, id) == 0) return &s->req[i];
    return NULL;
}

static void on_text(void* user, const char* id, const char* delta, const char* full) {
    request* r = find((state*)user, id);
    if (!r) return;
    strncat(r->text, delta, sizeof r->text - strlen(r->text) - 1);
    if (strcmp(r->text, full) != 0) ((state*)user)->bad = 1;
}

static void on_completed(void* user, const char* id, const gllm_done* d) {
    request* r = find((state*)user, id);
    if (!r) return;
    r->ends++;
    snprintf(r->done_text, sizeof r->done_text, "%s", d->text);
    r->completion_tokens = (long long)d->completion_tokens;
    r->deadline_met = d->ttft_deadline_met;
    if (isnan(d->total_ms) || strcmp(d->id, id) != 0) ((state*)user)->bad = 1;
}

static void on_failed(void* user, const char* id, const char* code, const char* message) {
    request* r = find((state*)user, id);
    (void)message;
    if (!r) {   /* a memory op */
        ((state*)user)->answers++;
        snprintf(((state*)user)->op_failed_code, sizeof ((state*)user)->op_failed_code, "%s", code);
        return;
    }
    r->ends++;
    r->failed = 1;
    snprintf(r->code, sizeof r->code, "%s", code);
}

static void on_snapshot(void* user, const char* id, int64_t tokens, const uint8_t* blob, size_t len) {
    state* s = (state*)user;
    (void)id;
    s->answers++;
    s->snap_tokens = (long long)tokens;
    if (len <= sizeof s->blob) {
        memcpy(s->blob, blob, len);
        s->blob_len = len;
    }
}

static void on_restored(void* user, const char* id, int64_t tokens, int64_t new_blocks) {
    state* s = (state*)user;
    (void)id;
    (void)new_blocks;
    s->answers++;
    s->restored_tokens = (long long)tokens;
}

static void on_pinned(void* user, const char* id, const char* pin, int64_t tokens) {
    state* s = (state*)user;
    (void)id;
    s->answers++;
    snprintf(s->pin, sizeof s->pin, "%s", pin);
    s->pinned_tokens = (long long)tokens;
}

static void on_unpinned(void* user, const char* id, const char* pin, int found) {
    state* s = (state*)user;
    (void)id;
    s->answers++;
    s->found = found && strcmp(pin, s->pin) == 0;
}

static void on_embeddings(void* user, const char* id, const float* v, size_t n, size_t dim, int64_t prompt_tokens) {
    state* s = (state*)user;
    (void)id;
    s->answers++;
    s->n_vectors = n;
    s->dim = dim;
    s->vectors_ok = n == 3 && dim > 0 && prompt_tokens > 0;
    for (size_t i = 0; s->vectors_ok && i < n; i++) {
        double norm = 0;
        for (size_t j = 0; j < dim; j++) norm += (double)v[i * dim + j] * v[i * dim + j];
        if (fabs(sqrt(norm) - 1.0) > 1e-5) s->vectors_ok = 0;
    }
    if (s->vectors_ok && (memcmp(v, v + 2 * dim, dim * sizeof *v) != 0 || memcmp(v, v + dim, dim * sizeof *v) == 0))
        s->vectors_ok = 0;
}

static void on_connection_changed(void* user, int up) {
    if (up) ((state*)user)->connected++;
}

static void on_stats(void* user, const char* json) {
    if (strstr(json, "\"kv_total_blocks\"")) ((state*)user)->stats++;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void nap(void) {
    struct timespec ts = {0, 2000000};
    nanosleep(&ts, NULL);
}

int main(int argc, char** argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s HOST PORT\n", argv[0]);
        return 2;
    }
    state s;
    memset(&s, 0, sizeof s);
    gllm_client* c = gllm_client_new();
    gllm_callbacks cb = {&s,        on_text,     on_completed, on_failed,     on_connection_changed, on_stats,
                         on_snapshot, on_restored, on_pinned,    on_unpinned,   on_embeddings};
    gllm_client_set_callbacks(c, &cb);
    if (gllm_client_connect(c, argv[1], (uint16_t)atoi(argv[2]), "c-abi-test/0.1", NULL) != 0) {
        printf("FAIL connect\n");
        return 1;
    }
    gllm_generate_options o;
    gllm_generate_options_init(&o);
    o.prompt = "The ferryman of Eldmoor said";
    o.max_tokens = 12;
    o.temperature = 0.0;
    o.ignore_eos = 1;
    gllm_client_generate(c, &o, s.req[0].id, sizeof s.req[0].id);

    gllm_chat_message chat[2] = {{"system", "You are Lira, a bard."}, {"user", "Sing."}};
    gllm_generate_options m;
    gllm_generate_options_init(&m);
    m.id = "c-chat";
    m.messages = chat;
    m.n_messages = 2;
    m.max_tokens = 8;
    m.temperature = 0.0;
    m.ignore_eos = 1;
    m.max_tokens_per_s = 200.0;
    m.ttft_deadline_ms = 60000.0;
    gllm_client_generate(c, &m, s.req[1].id, sizeof s.req[1].id);

    gllm_generate_options b;
    gllm_generate_options_init(&b);
    b.prompt = "x";
    b.temperature = -1.0;
    gllm_client_generate(c, &b, s.req[2].id, sizeof s.req[2].id);
    gllm_client_stats(c);   /* dropped while not connected: asked again below */

    double t0 = now_s();
    int asked = 0;
    while (s.req[0].ends + s.req[1].ends + s.req[2].ends < 3 || s.stats == 0) {
        if (now_s() - t0 > 60) {
            printf("FAIL timed out (ends %d %d %d, stats %d)\n", s.req[0].ends, s.req[1].ends, s.req[2].ends, s.stats);
            return 1;
        }
        if (gllm_client_is_connected(c) && !asked) {
            gllm_client_stats(c);
            asked = 1;
        }
        gllm_client_poll(c, 2000);
        nap();
    }
    int ok = 1;
    for (int i = 0; i < 2; i++) {
        request* r = &s.req[i];
        if (r->ends != 1 || r->failed || strcmp(r->text, r->done_text) != 0 || r->completion_tokens < 1) {
            printf("FAIL request %s: ends %d failed %d (%s) streamed '%s' done '%s'\n", r->id, r->ends, r->failed,
                   r->code, r->text, r->done_text);
            ok = 0;
        }
    }
    if (s.req[0].deadline_met != -1 || s.req[1].deadline_met != 1) {
        printf("FAIL ttft_deadline_met: %d without a deadline (expected -1), %d with one (expected 1)\n",
               s.req[0].deadline_met, s.req[1].deadline_met);
        ok = 0;
    }
    if (s.req[2].ends != 1 || !s.req[2].failed || strcmp(s.req[2].code, "bad_request") != 0) {
        printf("FAIL the bad request: ends %d code '%s'\n", s.req[2].ends, s.req[2].code);
        ok = 0;
    }
    if (s.connected != 1 || s.bad) {
        printf("FAIL connected %d, contract breach %d\n", s.connected, s.bad);
        ok = 0;
    }
    /* NPC memory, one op at a time: each must end with exactly one answer */
    const char* texts[3] = {"the smith", "the dragon", "the smith"};
    for (int step = 0; ok && step < 6; step++) {
        char id[64];
        int before = s.answers;
        s.op_failed_code[0] = 0;
        if (step == 0) gllm_client_snapshot(c, "c-chat", "int8", NULL, id, sizeof id);
        if (step == 1) gllm_client_restore(c, s.blob, s.blob_len, "c-restore", id, sizeof id);
        if (step == 2) {
            s.blob[s.blob_len / 2] ^= 1;
            gllm_client_restore(c, s.blob, s.blob_len, NULL, id, sizeof id);
        }
        if (step == 3)
            gllm_client_pin_prompt(c, "The river spirits guard the old stone bridge of Eldmoor, and every traveller "
                                      "leaves a copper coin for them.", NULL, id, sizeof id);
        if (step == 4) gllm_client_unpin(c, s.pin, NULL, id, sizeof id);
        if (step == 5) {
            gllm_client_report_idle(c, 4.0);
            gllm_client_embed(c, texts, 3, NULL, NULL, id, sizeof id);
        }
        t0 = now_s();
        while (s.answers == before && now_s() - t0 < 60) {
            gllm_client_poll(c, 2000);
            nap();
        }
        int failed = s.op_failed_code[0] != 0;
        if (s.answers != before + 1 || failed != (step == 2)) {
            printf("FAIL memory op %d (%s): %d answers, failure '%s'\n", step, id, s.answers - before,
                   s.op_failed_code);
            ok = 0;
        }
    }
    if (ok && (s.snap_tokens <= 0 || s.restored_tokens != s.snap_tokens || strcmp(s.op_failed_code, "") != 0)) {
        printf("FAIL snapshot %lld tokens, restored %lld\n", s.snap_tokens, s.restored_tokens);
        ok = 0;
    }
    if (ok && (strncmp(s.pin, "pin-", 4) != 0 || s.pinned_tokens <= 0 || !s.found || !s.vectors_ok)) {
        printf("FAIL pin '%s' (%lld tokens, found %d), embeddings %zu x %zu ok %d\n", s.pin, s.pinned_tokens, s.found,
               s.n_vectors, s.dim, s.vectors_ok);
        ok = 0;
    }
    if (gllm_client_in_flight(c) != 0) {
        printf("FAIL in_flight %d\n", gllm_client_in_flight(c));
        ok = 0;
    }
    gllm_client_free(c);
    if (!ok) return 1;
    printf("C ABI OK version=%s prompt_id=%s text=\"%s\" chat_text=\"%s\" snapshot=%lld tokens pin=%s dim=%zu\n",
           gllm_version(), s.req[0].id, s.req[0].done_text, s.req[1].done_text, s.snap_tokens, s.pin, s.dim);
    return 0;
}
