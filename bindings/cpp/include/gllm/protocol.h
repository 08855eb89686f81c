// The messages of the gllm bridge protocol v1 (bindings/PROTOCOL.md §5), built in the documented key order so
// that they match the test vectors of §9 byte for byte, and typed views of what the server sends.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "gllm/value.h"

namespace gllm {

constexpr int kProtocolVersion = 1;

struct ChatMessage {
    std::string role;
    std::string content;
    static ChatMessage system(std::string c) { return {"system", std::move(c)}; }
    static ChatMessage user(std::string c) { return {"user", std::move(c)}; }
    static ChatMessage assistant(std::string c) { return {"assistant", std::move(c)}; }
};

// Every field of a generate message (§5.1), typed; an empty optional means "the server's default". `extra`
// (a map, or nil) carries fields added to the protocol later, written after the known ones.
struct GenerateOptions {
    std::string id;                                // empty: the client picks a unique one
    std::optional<std::string> prompt;
    std::optional<std::vector<ChatMessage>> messages;
    std::optional<int64_t> max_tokens;
    std::optional<double> temperature;
    std::optional<int64_t> top_k;
    std::optional<double> top_p;
    std::optional<double> min_p;
    std::optional<uint64_t> seed;
    std::optional<std::vector<std::string>> stop;
    std::optional<int64_t> logprobs;
    std::optional<int64_t> priority;
    std::optional<double> repetition_penalty;
    std::optional<double> presence_penalty;
    std::optional<double> frequency_penalty;
    std::optional<bool> ignore_eos;
    std::optional<double> max_tokens_per_s;        // [0, 1000]: pace the reply (tokens a second); 0 = unpaced
    std::optional<double> ttft_deadline_ms;        // [0, 3600000]: first token wanted within this; 0 = none
    // Structured output, at most one of the four (PROTOCOL.md §5.1): done.text then always parses.
    std::optional<std::string> json_schema;        // a JSON Schema as its JSON text (the server also takes a map)
    std::optional<std::string> regex;              // the whole output matches it
    std::optional<std::string> grammar;            // Lark or GBNF
    std::optional<std::vector<std::string>> choice;  // the output is exactly one of these
    std::optional<bool> cache_result;              // false: never answered from the server's result cache
    std::optional<bool> pin_prefix;                // true: keep the system messages' KV resident on the server
    Value extra;
};

// What a done message says about a finished request.
struct DoneInfo {
    std::string id;
    std::string finish_reason;   // "stop", "length", "cancelled" or "error"
    std::string text;            // the whole completion
    int64_t prompt_tokens = 0, completion_tokens = 0, cached_tokens = 0;
    std::optional<double> ttft_ms;   // nil when no token was produced
    double total_ms = 0.0;
    std::optional<bool> ttft_deadline_met;   // only when the request had a ttft_deadline_ms: was it met
    std::string error;           // what failed, when finish_reason is "error"
    Value raw;                   // the message as received (fields added later)
    static DoneInfo from_message(const Value& m);
};

// The server's welcome (§5.2).
struct WelcomeInfo {
    int version = 0;
    std::string model, server;
    int64_t max_seq_len = 0;
    int lease_ms = 5000, max_inflight = 16;
    int64_t max_message_bytes = 1 << 20;
    Value raw;
    static WelcomeInfo from_message(const Value& m);
};

// The answers to the NPC-memory ops (PROTOCOL.md §5.3).
// snapshot: an opaque blob for the save game holding the KV of `tokens` tokens (give it to restore).
struct SnapshotInfo {
    std::string id;
    int64_t tokens = 0;
    std::vector<uint8_t> blob;
    bool has_blob = false;       // false when the reply carried no bin blob (the client then fails the op)
    static SnapshotInfo from_message(const Value& m);
};
// restored: `tokens` tokens of KV are in the server's prefix cache; `new_blocks` KV blocks were not cached before.
struct RestoreInfo {
    std::string id;
    int64_t tokens = 0, new_blocks = 0;
    static RestoreInfo from_message(const Value& m);
};
// pinned: the pin's name (for unpin; the same prefix always gets the same name) and its resident tokens.
struct PinInfo {
    std::string id, pin;
    int64_t tokens = 0;
    static PinInfo from_message(const Value& m);
};
// unpinned: whether the server had the pin.
struct UnpinInfo {
    std::string id, pin;
    bool found = false;
    static UnpinInfo from_message(const Value& m);
};
// embeddings: one unit-length vector per input, in order, and the tokens they cost.
struct EmbeddingsInfo {
    std::string id;
    std::vector<std::vector<float>> vectors;
    int64_t prompt_tokens = 0;
    static EmbeddingsInfo from_message(const Value& m);
};

// Builders of the client's messages (msgpack bytes, canonical key order).
namespace messages {
std::vector<uint8_t> hello(const std::string& client, const std::string* token = nullptr, int v = kProtocolVersion);
std::vector<uint8_t> generate(const std::string& id, const GenerateOptions& o);
std::vector<uint8_t> cancel(const std::string& id);
std::vector<uint8_t> ping(const Value& t);   // t is echoed back (nil for keepalives)
// A frame report: ms (smoothed), then target_ms, max_ms (the longest frame since the last report), frames (frames
// since the last report) and over (of those, the frames over 1.1 x target_ms), each written only when given.
std::vector<uint8_t> frame(double ms, std::optional<double> target_ms, std::optional<double> max_ms = std::nullopt,
                           std::optional<int64_t> frames = std::nullopt, std::optional<int64_t> over = std::nullopt);
std::vector<uint8_t> stats_request();
std::vector<uint8_t> idle(double ms);   // an idle window: the device is the engine's for the next ms milliseconds
// NPC memory (§5.3). snapshot: exactly one of a conversation (non-empty) and tokens; an empty encoding is left out.
std::vector<uint8_t> snapshot(const std::string& id, const std::string& conversation, const std::vector<int64_t>& tokens,
                              const std::string& encoding);
std::vector<uint8_t> restore(const std::string& id, const std::vector<uint8_t>& blob);
// pin: exactly one of prompt, messages, tokens (null pointers: not given).
std::vector<uint8_t> pin(const std::string& id, const std::string* prompt, const std::vector<ChatMessage>* messages,
                         const std::vector<int64_t>* tokens);
std::vector<uint8_t> unpin(const std::string& id, const std::string& pin);
std::vector<uint8_t> embed(const std::string& id, const std::vector<std::string>& input, const std::string& pooling);
}  // namespace messages

}  // namespace gllm
