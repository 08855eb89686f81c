/* A plain C ABI over gllm::Client, for C, Rust, Zig or a custom engine. Same model as the C++ API: connect,
 * start requests, and call gllm_client_poll() once per frame on the game thread, which invokes the callbacks
 * there. Every request ends with exactly one on_completed or on_failed. Strings passed to callbacks are valid
 * only during the call. No function here may be called from inside a callback except generate/cancel/stats. */
#ifndef GLLM_CLIENT_C_H
#define GLLM_CLIENT_C_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32) && defined(GLLM_C_SHARED)
#define GLLM_C_API __declspec(dllexport)
#else
#define GLLM_C_API
#endif

typedef struct gllm_client gllm_client;

typedef struct gllm_chat_message {
    const char* role;      /* "system", "user", "assistant" */
    const char* content;
} gllm_chat_message;

/* Fill with gllm_generate_options_init(): every field then means "the server's default". */
typedef struct gllm_generate_options {
    const char* id;                          /* NULL: the client picks a unique id */
    const char* prompt;                      /* exactly one of prompt and messages */
    const gllm_chat_message* messages;
    size_t n_messages;
    int64_t max_tokens;                      /* < 0: unset */
    double temperature;                      /* NaN: unset (as are top_p, min_p and the penalties) */
    int64_t top_k;                           /* < 0: unset */
    double top_p;
    double min_p;
    int has_seed;
    uint64_t seed;
    const char* const* stop;
    size_t n_stop;
    int64_t logprobs;                        /* < 0: unset */
    int has_priority;
    int64_t priority;
    double repetition_penalty;
    double presence_penalty;
    double frequency_penalty;
    int ignore_eos;                          /* < 0: unset, 0 false, 1 true */
    double max_tokens_per_s;                 /* NaN: unset; [0, 1000] tokens a second, 0 = unpaced */
    double ttft_deadline_ms;                 /* NaN: unset; [0, 3600000] ms to the first token, 0 = none */
    /* Structured output, at most one (NULL / n_choice 0: unset); done's text then always parses. */
    const char* json_schema;                 /* a JSON Schema as JSON text */
    const char* regex;
    const char* grammar;                     /* Lark or GBNF */
    const char* const* choice;
    size_t n_choice;
    int cache_result;                        /* < 0: unset, 0: never from the server's result cache, 1: may be */
    int pin_prefix;                          /* < 0: unset, 0 false, 1: keep the system messages' KV resident */
} gllm_generate_options;

typedef struct gllm_done {
    const char* id;
    const char* finish_reason;               /* "stop", "length", "cancelled" or "error" */
    const char* text;                        /* the whole completion */
    int64_t prompt_tokens, completion_tokens, cached_tokens;
    double ttft_ms;                          /* NaN when no token was produced */
    double total_ms;
    int ttft_deadline_met;                   /* -1: no deadline was asked (absent), 0 missed, 1 met */
} gllm_done;

typedef struct gllm_callbacks {
    void* user;
    void (*on_text)(void* user, const char* id, const char* delta, const char* full_so_far);
    void (*on_completed)(void* user, const char* id, const gllm_done* done);
    void (*on_failed)(void* user, const char* id, const char* code, const char* message);
    void (*on_connection_changed)(void* user, int connected);
    void (*on_stats)(void* user, const char* stats_json);
    /* The answers to the NPC-memory ops (each op ends with exactly one of these or on_failed). */
    void (*on_snapshot)(void* user, const char* id, int64_t tokens, const uint8_t* blob, size_t blob_len);
    void (*on_restored)(void* user, const char* id, int64_t tokens, int64_t new_blocks);
    void (*on_pinned)(void* user, const char* id, const char* pin, int64_t tokens);
    void (*on_unpinned)(void* user, const char* id, const char* pin, int found);
    /* n_vectors unit-length vectors of dim floats each, row after row, in the order of the inputs. */
    void (*on_embeddings)(void* user, const char* id, const float* vectors, size_t n_vectors, size_t dim,
                          int64_t prompt_tokens);
} gllm_callbacks;

GLLM_C_API const char* gllm_version(void);
GLLM_C_API void gllm_generate_options_init(gllm_generate_options* o);
GLLM_C_API gllm_client* gllm_client_new(void);
GLLM_C_API void gllm_client_free(gllm_client* c);   /* closes it first */
GLLM_C_API void gllm_client_set_callbacks(gllm_client* c, const gllm_callbacks* cb);
/* client_name and token may be NULL. Returns 0, or -1 if already connected / bad arguments. */
GLLM_C_API int gllm_client_connect(gllm_client* c, const char* host, uint16_t port, const char* client_name,
                                   const char* token);
/* Copies the request id (NUL-terminated) into id_out; returns its length, or -1 if it does not fit. */
GLLM_C_API int gllm_client_generate(gllm_client* c, const gllm_generate_options* o, char* id_out, size_t id_cap);
GLLM_C_API void gllm_client_cancel(gllm_client* c, const char* id);
/* Once per frame (target_ms <= 0: 60 fps): every 250 ms one frame report goes out with the smoothed frame time,
 * the longest frame, the frame count and the count over 1.1 x target_ms since the previous report. */
GLLM_C_API void gllm_client_report_frame(gllm_client* c, double ms, double target_ms);
GLLM_C_API void gllm_client_stats(gllm_client* c);
/* The device is the engine's for the next ms milliseconds (the game's frame work is done): not answered. */
GLLM_C_API void gllm_client_report_idle(gllm_client* c, double ms);
/* NPC memory (PROTOCOL.md §5.3). Each returns like gllm_client_generate (the op's id in id_out; id NULL: the
 * client picks one) and the op ends with exactly one answer callback or on_failed. encoding / pooling: NULL for
 * the server's default ("raw" / "mean"). */
GLLM_C_API int gllm_client_snapshot(gllm_client* c, const char* conversation, const char* encoding, const char* id,
                                    char* id_out, size_t id_cap);
GLLM_C_API int gllm_client_snapshot_tokens(gllm_client* c, const int64_t* tokens, size_t n_tokens,
                                           const char* encoding, const char* id, char* id_out, size_t id_cap);
GLLM_C_API int gllm_client_restore(gllm_client* c, const uint8_t* blob, size_t blob_len, const char* id,
                                   char* id_out, size_t id_cap);
GLLM_C_API int gllm_client_pin(gllm_client* c, const gllm_chat_message* messages, size_t n_messages, const char* id,
                               char* id_out, size_t id_cap);
GLLM_C_API int gllm_client_pin_prompt(gllm_client* c, const char* prompt, const char* id, char* id_out,
                                      size_t id_cap);
GLLM_C_API int gllm_client_pin_tokens(gllm_client* c, const int64_t* tokens, size_t n_tokens, const char* id,
                                      char* id_out, size_t id_cap);
GLLM_C_API int gllm_client_unpin(gllm_client* c, const char* pin, const char* id, char* id_out, size_t id_cap);
GLLM_C_API int gllm_client_embed(gllm_client* c, const char* const* texts, size_t n_texts, const char* pooling,
                                 const char* id, char* id_out, size_t id_cap);
GLLM_C_API int gllm_client_poll(gllm_client* c, int64_t budget_us);   /* events dispatched */
GLLM_C_API int gllm_client_is_connected(const gllm_client* c);
GLLM_C_API int gllm_client_in_flight(const gllm_client* c);
GLLM_C_API void gllm_client_close(gllm_client* c);

#ifdef __cplusplus
}
#endif
#endif /* GLLM_CLIENT_C_H */
