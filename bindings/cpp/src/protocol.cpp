// Message builders and typed views (see protocol.h).
#include "gllm/protocol.h"

#include <algorithm>
#include <climits>

namespace gllm {

DoneInfo DoneInfo::from_message(const Value& m) {
    DoneInfo d;
    if (const std::string* s = m.get_string("id")) d.id = *s;
    if (const std::string* s = m.get_string("finish_reason")) d.finish_reason = *s;
    if (const std::string* s = m.get_string("text")) d.text = *s;
    if (const std::string* s = m.get_string("error")) d.error = *s;
    if (const Value* u = m.get_map("usage")) {
        d.prompt_tokens = u->get_int("prompt_tokens").value_or(0);
        d.completion_tokens = u->get_int("completion_tokens").value_or(0);
        d.cached_tokens = u->get_int("cached_tokens").value_or(0);
    }
    if (const Value* t = m.get_map("timings")) {
        d.ttft_ms = t->get_double("ttft_ms");
        d.total_ms = t->get_double("total_ms").value_or(0.0);
        d.ttft_deadline_met = t->get_bool("ttft_deadline_met");
    }
    d.raw = m;
    return d;
}

WelcomeInfo WelcomeInfo::from_message(const Value& m) {
    WelcomeInfo w;
    w.version = static_cast<int>(m.get_int("v").value_or(1));
    if (const std::string* s = m.get_string("model")) w.model = *s;
    if (const std::string* s = m.get_string("server")) w.server = *s;
    w.max_seq_len = m.get_int("max_seq_len").value_or(0);
    auto lease = m.get_int("lease_ms");
    if (lease && *lease > 0) w.lease_ms = static_cast<int>(std::min<int64_t>(*lease, INT_MAX));
    auto inflight = m.get_int("max_inflight");
    if (inflight && *inflight > 0) w.max_inflight = static_cast<int>(std::min<int64_t>(*inflight, INT_MAX));
    auto bytes = m.get_int("max_message_bytes");
    if (bytes && *bytes > 0) w.max_message_bytes = *bytes;
    w.raw = m;
    return w;
}

SnapshotInfo SnapshotInfo::from_message(const Value& m) {
    SnapshotInfo r;
    if (const std::string* s = m.get_string("id")) r.id = *s;
    r.tokens = m.get_int("tokens").value_or(0);
    const Value* blob = m.find("blob");
    if (blob && blob->type() == Value::Type::Bin) {
        r.blob.assign(blob->as_string().begin(), blob->as_string().end());
        r.has_blob = true;
    }
    return r;
}

RestoreInfo RestoreInfo::from_message(const Value& m) {
    RestoreInfo r;
    if (const std::string* s = m.get_string("id")) r.id = *s;
    r.tokens = m.get_int("tokens").value_or(0);
    r.new_blocks = m.get_int("new_blocks").value_or(0);
    return r;
}

PinInfo PinInfo::from_message(const Value& m) {
    PinInfo r;
    if (const std::string* s = m.get_string("id")) r.id = *s;
    if (const std::string* s = m.get_string("pin")) r.pin = *s;
    r.tokens = m.get_int("tokens").value_or(0);
    return r;
}

UnpinInfo UnpinInfo::from_message(const Value& m) {
    UnpinInfo r;
    if (const std::string* s = m.get_string("id")) r.id = *s;
    if (const std::string* s = m.get_string("pin")) r.pin = *s;
    r.found = m.get_bool("found").value_or(false);
    return r;
}

EmbeddingsInfo EmbeddingsInfo::from_message(const Value& m) {
    EmbeddingsInfo r;
    if (const std::string* s = m.get_string("id")) r.id = *s;
    if (const Value* vs = m.get_array("vectors")) {
        r.vectors.resize(vs->size());
        for (size_t i = 0; i < vs->size(); i++) {
            const Value& v = vs->at(i);
            if (!v.is_array()) continue;
            r.vectors[i].reserve(v.size());
            for (size_t j = 0; j < v.size(); j++) r.vectors[i].push_back(static_cast<float>(v.at(j).as_double()));
        }
    }
    r.prompt_tokens = m.get_int("prompt_tokens").value_or(0);
    return r;
}

namespace messages {
namespace {
const char* const kKnownGenerateKeys[] = {
    "op", "id", "prompt", "messages", "max_tokens", "temperature", "top_k", "top_p", "min_p", "seed", "stop",
    "logprobs", "priority", "repetition_penalty", "presence_penalty", "frequency_penalty", "ignore_eos",
    "max_tokens_per_s", "ttft_deadline_ms",
    "json_schema", "regex", "grammar", "choice",
    "cache_result", "pin_prefix",
};
bool known_key(const std::string& k) {
    for (const char* known : kKnownGenerateKeys)
        if (k == known) return true;
    return false;
}
void write_strings(msgpack::Writer& w, const char* key, const std::vector<std::string>& list) {
    w.str(key);
    w.array_header(list.size());
    for (const std::string& s : list) w.str(s);
}
}  // namespace

std::vector<uint8_t> hello(const std::string& client, const std::string* token, int v) {
    std::vector<uint8_t> out;
    msgpack::Writer w(&out);
    w.map_header(token ? 4 : 3);
    w.str("op"); w.str("hello");
    w.str("v"); w.integer(v);
    w.str("client"); w.str(client);
    if (token) { w.str("token"); w.str(*token); }
    return out;
}

std::vector<uint8_t> generate(const std::string& id, const GenerateOptions& o) {
    size_t n = 2 + o.prompt.has_value() + o.messages.has_value() + o.max_tokens.has_value() + o.temperature.has_value()
               + o.top_k.has_value() + o.top_p.has_value() + o.min_p.has_value() + o.seed.has_value()
               + o.stop.has_value() + o.logprobs.has_value() + o.priority.has_value()
               + o.repetition_penalty.has_value() + o.presence_penalty.has_value() + o.frequency_penalty.has_value()
               + o.ignore_eos.has_value() + o.max_tokens_per_s.has_value() + o.ttft_deadline_ms.has_value()
               + o.json_schema.has_value() + o.regex.has_value() + o.grammar.has_value() + o.choice.has_value()
               + o.cache_result.has_value() + o.pin_prefix.has_value();
    if (o.extra.is_map())
        for (size_t i = 0; i < o.extra.size(); i++) n += !known_key(o.extra.key_at(i));
    std::vector<uint8_t> out;
    out.reserve(256);
    msgpack::Writer w(&out);
    w.map_header(n);
    w.str("op"); w.str("generate");
    w.str("id"); w.str(id);
    if (o.prompt) { w.str("prompt"); w.str(*o.prompt); }
    if (o.messages) {
        w.str("messages");
        w.array_header(o.messages->size());
        for (const ChatMessage& m : *o.messages) {
            w.map_header(2);
            w.str("role"); w.str(m.role);
            w.str("content"); w.str(m.content);
        }
    }
    if (o.max_tokens) { w.str("max_tokens"); w.integer(*o.max_tokens); }
    if (o.temperature) { w.str("temperature"); w.float64(*o.temperature); }
    if (o.top_k) { w.str("top_k"); w.integer(*o.top_k); }
    if (o.top_p) { w.str("top_p"); w.float64(*o.top_p); }
    if (o.min_p) { w.str("min_p"); w.float64(*o.min_p); }
    if (o.seed) { w.str("seed"); w.uinteger(*o.seed); }
    if (o.stop) write_strings(w, "stop", *o.stop);
    if (o.logprobs) { w.str("logprobs"); w.integer(*o.logprobs); }
    if (o.priority) { w.str("priority"); w.integer(*o.priority); }
    if (o.repetition_penalty) { w.str("repetition_penalty"); w.float64(*o.repetition_penalty); }
    if (o.presence_penalty) { w.str("presence_penalty"); w.float64(*o.presence_penalty); }
    if (o.frequency_penalty) { w.str("frequency_penalty"); w.float64(*o.frequency_penalty); }
    if (o.ignore_eos) { w.str("ignore_eos"); w.boolean(*o.ignore_eos); }
    if (o.max_tokens_per_s) { w.str("max_tokens_per_s"); w.float64(*o.max_tokens_per_s); }
    if (o.ttft_deadline_ms) { w.str("ttft_deadline_ms"); w.float64(*o.ttft_deadline_ms); }
    if (o.json_schema) { w.str("json_schema"); w.str(*o.json_schema); }
    if (o.regex) { w.str("regex"); w.str(*o.regex); }
    if (o.grammar) { w.str("grammar"); w.str(*o.grammar); }
    if (o.choice) write_strings(w, "choice", *o.choice);
    if (o.cache_result) { w.str("cache_result"); w.boolean(*o.cache_result); }
    if (o.pin_prefix) { w.str("pin_prefix"); w.boolean(*o.pin_prefix); }
    if (o.extra.is_map())
        for (size_t i = 0; i < o.extra.size(); i++) {
            if (known_key(o.extra.key_at(i))) continue;
            w.str(o.extra.key_at(i));
            w.value(o.extra.at(i));
        }
    return out;
}

std::vector<uint8_t> cancel(const std::string& id) {
    std::vector<uint8_t> out;
    msgpack::Writer w(&out);
    w.map_header(2);
    w.str("op"); w.str("cancel");
    w.str("id"); w.str(id);
    return out;
}

std::vector<uint8_t> ping(const Value& t) {
    std::vector<uint8_t> out;
    msgpack::Writer w(&out);
    w.map_header(2);
    w.str("op"); w.str("ping");
    w.str("t"); w.value(t);
    return out;
}

std::vector<uint8_t> frame(double ms, std::optional<double> target_ms, std::optional<double> max_ms,
                           std::optional<int64_t> frames, std::optional<int64_t> over) {
    std::vector<uint8_t> out;
    msgpack::Writer w(&out);
    w.map_header(2 + target_ms.has_value() + max_ms.has_value() + frames.has_value() + over.has_value());
    w.str("op"); w.str("frame");
    w.str("ms"); w.float64(ms);
    if (target_ms) { w.str("target_ms"); w.float64(*target_ms); }
    if (max_ms) { w.str("max_ms"); w.float64(*max_ms); }
    if (frames) { w.str("frames"); w.integer(*frames); }
    if (over) { w.str("over"); w.integer(*over); }
    return out;
}

std::vector<uint8_t> stats_request() {
    std::vector<uint8_t> out;
    msgpack::Writer w(&out);
    w.map_header(1);
    w.str("op"); w.str("stats");
    return out;
}

std::vector<uint8_t> idle(double ms) {
    std::vector<uint8_t> out;
    msgpack::Writer w(&out);
    w.map_header(2);
    w.str("op"); w.str("idle");
    w.str("ms"); w.float64(ms);
    return out;
}

namespace {
void write_tokens(msgpack::Writer& w, const std::vector<int64_t>& tokens) {
    w.str("tokens");
    w.array_header(tokens.size());
    for (int64_t t : tokens) w.integer(t);
}
}  // namespace

std::vector<uint8_t> snapshot(const std::string& id, const std::string& conversation, const std::vector<int64_t>& tokens,
                              const std::string& encoding) {
    std::vector<uint8_t> out;
    msgpack::Writer w(&out);
    w.map_header(3 + !encoding.empty());
    w.str("op"); w.str("snapshot");
    w.str("id"); w.str(id);
    if (!conversation.empty()) { w.str("conversation"); w.str(conversation); }
    else write_tokens(w, tokens);
    if (!encoding.empty()) { w.str("encoding"); w.str(encoding); }
    return out;
}

std::vector<uint8_t> restore(const std::string& id, const std::vector<uint8_t>& blob) {
    std::vector<uint8_t> out;
    out.reserve(blob.size() + 48);
    msgpack::Writer w(&out);
    w.map_header(3);
    w.str("op"); w.str("restore");
    w.str("id"); w.str(id);
    w.str("blob"); w.bin(std::string_view(reinterpret_cast<const char*>(blob.data()), blob.size()));
    return out;
}

std::vector<uint8_t> pin(const std::string& id, const std::string* prompt, const std::vector<ChatMessage>* msgs,
                         const std::vector<int64_t>* tokens) {
    std::vector<uint8_t> out;
    msgpack::Writer w(&out);
    w.map_header(3);
    w.str("op"); w.str("pin");
    w.str("id"); w.str(id);
    if (prompt) { w.str("prompt"); w.str(*prompt); }
    else if (msgs) {
        w.str("messages");
        w.array_header(msgs->size());
        for (const ChatMessage& m : *msgs) {
            w.map_header(2);
            w.str("role"); w.str(m.role);
            w.str("content"); w.str(m.content);
        }
    } else if (tokens) write_tokens(w, *tokens);
    else { w.str("tokens"); w.array_header(0); }
    return out;
}

std::vector<uint8_t> unpin(const std::string& id, const std::string& pin) {
    std::vector<uint8_t> out;
    msgpack::Writer w(&out);
    w.map_header(3);
    w.str("op"); w.str("unpin");
    w.str("id"); w.str(id);
    w.str("pin"); w.str(pin);
    return out;
}

std::vector<uint8_t> embed(const std::string& id, const std::vector<std::string>& input, const std::string& pooling) {
    std::vector<uint8_t> out;
    msgpack::Writer w(&out);
    w.map_header(3 + !pooling.empty());
    w.str("op"); w.str("embed");
    w.str("id"); w.str(id);
    w.str("input");
    w.array_header(input.size());
    for (const std::string& s : input) w.str(s);
    if (!pooling.empty()) { w.str("pooling"); w.str(pooling); }
    return out;
}

}  // namespace messages
}  // namespace gllm
