// The C ABI (gllm_client_c.h) over gllm::Client.
#include "gllm/gllm_client_c.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <new>

#include "gllm/client.h"

struct gllm_client {
    gllm::Client client;
    gllm_callbacks cb{};
};

namespace {
std::optional<double> opt_double(double v) { return std::isnan(v) ? std::nullopt : std::optional<double>(v); }
std::optional<int64_t> opt_int(int64_t v) { return v < 0 ? std::nullopt : std::optional<int64_t>(v); }
int copy_id(const std::string& id, char* id_out, size_t id_cap) {
    if (id_out) {
        if (id.size() + 1 > id_cap) return -1;
        std::memcpy(id_out, id.c_str(), id.size() + 1);
    }
    return static_cast<int>(id.size());
}
std::string str(const char* s) { return s ? std::string(s) : std::string(); }
std::vector<int64_t> token_list(const int64_t* tokens, size_t n) {
    return tokens ? std::vector<int64_t>(tokens, tokens + n) : std::vector<int64_t>();
}
}  // namespace

extern "C" {

const char* gllm_version(void) { return "0.1.0"; }

void gllm_generate_options_init(gllm_generate_options* o) {
    if (!o) return;
    std::memset(o, 0, sizeof *o);
    double nan = std::numeric_limits<double>::quiet_NaN();
    o->max_tokens = -1;
    o->temperature = o->top_p = o->min_p = nan;
    o->repetition_penalty = o->presence_penalty = o->frequency_penalty = nan;
    o->max_tokens_per_s = o->ttft_deadline_ms = nan;
    o->top_k = -1;
    o->logprobs = -1;
    o->ignore_eos = -1;
    o->cache_result = o->pin_prefix = -1;
}

gllm_client* gllm_client_new(void) { return new (std::nothrow) gllm_client(); }

void gllm_client_free(gllm_client* c) {
    if (!c) return;
    c->client.close();
    delete c;
}

void gllm_client_set_callbacks(gllm_client* c, const gllm_callbacks* cb) {
    if (!c) return;
    c->cb = cb ? *cb : gllm_callbacks{};
    gllm_callbacks* k = &c->cb;
    c->client.on_text = [k](const std::string& id, const std::string& delta, const std::string& full) {
        if (k->on_text) k->on_text(k->user, id.c_str(), delta.c_str(), full.c_str());
    };
    c->client.on_completed = [k](const std::string& id, const gllm::DoneInfo& d) {
        if (!k->on_completed) return;
        gllm_done done;
        done.id = id.c_str();
        done.finish_reason = d.finish_reason.c_str();
        done.text = d.text.c_str();
        done.prompt_tokens = d.prompt_tokens;
        done.completion_tokens = d.completion_tokens;
        done.cached_tokens = d.cached_tokens;
        done.ttft_ms = d.ttft_ms ? *d.ttft_ms : std::numeric_limits<double>::quiet_NaN();
        done.total_ms = d.total_ms;
        done.ttft_deadline_met = d.ttft_deadline_met ? (*d.ttft_deadline_met ? 1 : 0) : -1;
        k->on_completed(k->user, id.c_str(), &done);
    };
    c->client.on_failed = [k](const std::string& id, const std::string& code, const std::string& message) {
        if (k->on_failed) k->on_failed(k->user, id.c_str(), code.c_str(), message.c_str());
    };
    c->client.on_connection_changed = [k](bool up) {
        if (k->on_connection_changed) k->on_connection_changed(k->user, up ? 1 : 0);
    };
    c->client.on_stats = [k](const gllm::Value& m) {
        if (k->on_stats) k->on_stats(k->user, gllm::json::serialize(m).c_str());
    };
    c->client.on_snapshot = [k](const std::string& id, const gllm::SnapshotInfo& r) {
        if (k->on_snapshot) k->on_snapshot(k->user, id.c_str(), r.tokens, r.blob.data(), r.blob.size());
    };
    c->client.on_restored = [k](const std::string& id, const gllm::RestoreInfo& r) {
        if (k->on_restored) k->on_restored(k->user, id.c_str(), r.tokens, r.new_blocks);
    };
    c->client.on_pinned = [k](const std::string& id, const gllm::PinInfo& r) {
        if (k->on_pinned) k->on_pinned(k->user, id.c_str(), r.pin.c_str(), r.tokens);
    };
    c->client.on_unpinned = [k](const std::string& id, const gllm::UnpinInfo& r) {
        if (k->on_unpinned) k->on_unpinned(k->user, id.c_str(), r.pin.c_str(), r.found ? 1 : 0);
    };
    c->client.on_embeddings = [k](const std::string& id, const gllm::EmbeddingsInfo& r) {
        if (!k->on_embeddings) return;
        size_t dim = r.vectors.empty() ? 0 : r.vectors[0].size();
        std::vector<float> flat;
        flat.reserve(r.vectors.size() * dim);
        for (const auto& v : r.vectors) {
            std::vector<float> row(v);
            row.resize(dim, 0.0f);   // the server sends one dimension; keep the layout rectangular regardless
            flat.insert(flat.end(), row.begin(), row.end());
        }
        k->on_embeddings(k->user, id.c_str(), flat.data(), r.vectors.size(), dim, r.prompt_tokens);
    };
}

int gllm_client_connect(gllm_client* c, const char* host, uint16_t port, const char* client_name, const char* token) {
    if (!c || !host) return -1;
    gllm::ClientOptions o;
    o.client_name = client_name ? client_name : "c/0.1";
    if (token) o.token = token;
    return c->client.connect(host, port, std::move(o)) ? 0 : -1;
}

int gllm_client_generate(gllm_client* c, const gllm_generate_options* in, char* id_out, size_t id_cap) {
    if (!c || !in) return -1;
    gllm::GenerateOptions o;
    if (in->id) o.id = in->id;
    if (in->prompt) o.prompt = std::string(in->prompt);
    if (in->messages) {
        std::vector<gllm::ChatMessage> list;
        for (size_t i = 0; i < in->n_messages; i++)
            list.push_back({in->messages[i].role ? in->messages[i].role : "",
                            in->messages[i].content ? in->messages[i].content : ""});
        o.messages = std::move(list);
    }
    o.max_tokens = opt_int(in->max_tokens);
    o.temperature = opt_double(in->temperature);
    o.top_k = opt_int(in->top_k);
    o.top_p = opt_double(in->top_p);
    o.min_p = opt_double(in->min_p);
    if (in->has_seed) o.seed = in->seed;
    if (in->stop) {
        std::vector<std::string> stop;
        for (size_t i = 0; i < in->n_stop; i++) if (in->stop[i]) stop.emplace_back(in->stop[i]);
        o.stop = std::move(stop);
    }
    o.logprobs = opt_int(in->logprobs);
    if (in->has_priority) o.priority = in->priority;
    o.repetition_penalty = opt_double(in->repetition_penalty);
    o.presence_penalty = opt_double(in->presence_penalty);
    o.frequency_penalty = opt_double(in->frequency_penalty);
    if (in->ignore_eos >= 0) o.ignore_eos = in->ignore_eos != 0;
    o.max_tokens_per_s = opt_double(in->max_tokens_per_s);
    o.ttft_deadline_ms = opt_double(in->ttft_deadline_ms);
    if (in->json_schema) o.json_schema = std::string(in->json_schema);
    if (in->regex) o.regex = std::string(in->regex);
    if (in->grammar) o.grammar = std::string(in->grammar);
    if (in->choice && in->n_choice) {
        std::vector<std::string> choice;
        for (size_t i = 0; i < in->n_choice; i++) if (in->choice[i]) choice.emplace_back(in->choice[i]);
        o.choice = std::move(choice);
    }
    if (in->cache_result >= 0) o.cache_result = in->cache_result != 0;
    if (in->pin_prefix >= 0) o.pin_prefix = in->pin_prefix != 0;
    std::string id = c->client.generate(o);
    if (id_out) {
        if (id.size() + 1 > id_cap) return -1;
        std::memcpy(id_out, id.c_str(), id.size() + 1);
    }
    return static_cast<int>(id.size());
}

void gllm_client_cancel(gllm_client* c, const char* id) {
    if (c && id) c->client.cancel(id);
}

void gllm_client_report_frame(gllm_client* c, double ms, double target_ms) {
    if (c) c->client.report_frame(ms, target_ms);
}

void gllm_client_stats(gllm_client* c) {
    if (c) c->client.stats();
}

void gllm_client_report_idle(gllm_client* c, double ms) {
    if (c) c->client.report_idle(ms);
}

int gllm_client_snapshot(gllm_client* c, const char* conversation, const char* encoding, const char* id,
                         char* id_out, size_t id_cap) {
    if (!c) return -1;
    return copy_id(c->client.snapshot(str(conversation), str(encoding), str(id)), id_out, id_cap);
}

int gllm_client_snapshot_tokens(gllm_client* c, const int64_t* tokens, size_t n_tokens, const char* encoding,
                                const char* id, char* id_out, size_t id_cap) {
    if (!c) return -1;
    return copy_id(c->client.snapshot_tokens(token_list(tokens, n_tokens), str(encoding), str(id)), id_out, id_cap);
}

int gllm_client_restore(gllm_client* c, const uint8_t* blob, size_t blob_len, const char* id, char* id_out,
                        size_t id_cap) {
    if (!c) return -1;
    std::vector<uint8_t> bytes = blob ? std::vector<uint8_t>(blob, blob + blob_len) : std::vector<uint8_t>();
    return copy_id(c->client.restore(bytes, str(id)), id_out, id_cap);
}

int gllm_client_pin(gllm_client* c, const gllm_chat_message* messages, size_t n_messages, const char* id,
                    char* id_out, size_t id_cap) {
    if (!c) return -1;
    std::vector<gllm::ChatMessage> list;
    for (size_t i = 0; messages && i < n_messages; i++) list.push_back({str(messages[i].role), str(messages[i].content)});
    return copy_id(c->client.pin(list, str(id)), id_out, id_cap);
}

int gllm_client_pin_prompt(gllm_client* c, const char* prompt, const char* id, char* id_out, size_t id_cap) {
    if (!c) return -1;
    return copy_id(c->client.pin_prompt(str(prompt), str(id)), id_out, id_cap);
}

int gllm_client_pin_tokens(gllm_client* c, const int64_t* tokens, size_t n_tokens, const char* id, char* id_out,
                           size_t id_cap) {
    if (!c) return -1;
    return copy_id(c->client.pin_tokens(token_list(tokens, n_tokens), str(id)), id_out, id_cap);
}

int gllm_client_unpin(gllm_client* c, const char* pin, const char* id, char* id_out, size_t id_cap) {
    if (!c) return -1;
    return copy_id(c->client.unpin(str(pin), str(id)), id_out, id_cap);
}

int gllm_client_embed(gllm_client* c, const char* const* texts, size_t n_texts, const char* pooling, const char* id,
                      char* id_out, size_t id_cap) {
    if (!c) return -1;
    std::vector<std::string> list;
    for (size_t i = 0; texts && i < n_texts; i++) list.push_back(str(texts[i]));
    return copy_id(c->client.embed(list, str(pooling), str(id)), id_out, id_cap);
}

int gllm_client_poll(gllm_client* c, int64_t budget_us) {
    if (!c) return 0;
    return c->client.poll(std::chrono::microseconds(budget_us < 0 ? 0 : budget_us));
}

int gllm_client_is_connected(const gllm_client* c) { return c && c->client.is_connected() ? 1 : 0; }

int gllm_client_in_flight(const gllm_client* c) { return c ? c->client.in_flight() : 0; }

void gllm_client_close(gllm_client* c) {
    if (c) c->client.close();
}

}  // extern "C"
