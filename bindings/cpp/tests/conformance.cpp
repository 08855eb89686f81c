// The C++ runner of the cross-client conformance scenarios (tests/clients/scenarios.json) against a real
// `gllm serve`; run by tests/test_client_cpp.py through tests/clients/harness.py:
//     gllm_conformance --spec conformance-spec.json [--only name,name]
// Prints `PASS name` / `FAIL name: why` per scenario, `METRIC name k=v ...`, and `N passed, N failed`.
// No exceptions: a scenario returns "" when it passed, else why it failed (CHECK returns early).
#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include "gllm/client.h"

using namespace gllm;
using Clock = std::chrono::steady_clock;

#define CHECK(cond, what)                                 \
    do {                                                  \
        if (!(cond)) return std::string(what);            \
    } while (0)
#define TRY(expr)                                         \
    do {                                                  \
        std::string e_ = (expr);                          \
        if (!e_.empty()) return e_;                       \
    } while (0)

namespace {

Value g_spec;
std::string g_host;
uint16_t g_port = 0;
const Value* g_server = nullptr;

std::string F(double v) {
    char b[64];
    std::snprintf(b, sizeof b, "%.4f", v);
    std::string s = b;
    while (!s.empty() && s.back() == '0') s.pop_back();
    if (!s.empty() && s.back() == '.') s.pop_back();
    return s;
}

std::string Q(const std::string& s) { return json::serialize(Value::string(s)); }

template <class A, class B>
std::string Eq(const A& expected, const B& actual, const std::string& what);
std::string show(const std::string& s) { return Q(s); }
std::string show(double d) { return F(d); }
template <class T>
std::string show(const T& v) { return std::to_string(v); }
template <class A, class B>
std::string Eq(const A& expected, const B& actual, const std::string& what) {
    if (expected == actual) return "";
    return what + ": expected " + show(expected) + ", got " + show(actual);
}
#define EQUAL(a, b, what) TRY(Eq((a), (b), (what)))

std::vector<uint8_t> Hex(const std::string& hex) {
    std::vector<uint8_t> out;
    std::istringstream in(hex);
    std::string part;
    while (in >> part) out.push_back(static_cast<uint8_t>(std::stoul(part, nullptr, 16)));
    return out;
}

std::string ToHex(const std::vector<uint8_t>& b) {
    std::string s;
    char buf[4];
    for (size_t i = 0; i < b.size(); i++) {
        std::snprintf(buf, sizeof buf, i ? " %02x" : "%02x", b[i]);
        s += buf;
    }
    return s;
}

std::string SameBytes(const std::vector<uint8_t>& expected, const std::vector<uint8_t>& actual, const std::string& what) {
    if (expected == actual) return "";
    return what + ": expected " + ToHex(expected) + " | got " + ToHex(actual);
}

// Records everything a client dispatches, and every breach of the event contract.
struct Tracker {
    std::map<std::string, std::string> streamed;
    std::map<std::string, DoneInfo> done;
    std::map<std::string, std::pair<std::string, std::string>> failures;
    std::map<std::string, int> ends;
    std::map<std::string, Clock::time_point> first_text_at, end_at;   // when poll dispatched them
    std::vector<bool> connection;
    std::vector<std::vector<std::string>> errors;
    std::vector<Value> stats;
    std::vector<double> pongs;
    std::map<std::string, std::vector<Value>> logprobs;
    // the NPC-memory answers, by op id
    std::map<std::string, SnapshotInfo> snapshots;
    std::map<std::string, RestoreInfo> restores;
    std::map<std::string, PinInfo> pins;
    std::map<std::string, UnpinInfo> unpins;
    std::map<std::string, EmbeddingsInfo> embeddings;
    std::vector<std::string>* order = nullptr;
    std::string bad;
    std::function<void(const std::string&, const DoneInfo&)> on_completed;

    void attach(Client& c) {
        c.on_text = [this](const std::string& id, const std::string& delta, const std::string& full) {
            if (ends.count(id)) breach("text for " + id + " after it ended");
            std::string& s = streamed[id];
            if (delta.empty()) breach("an empty on_text for " + id);
            if (!first_text_at.count(id)) first_text_at[id] = Clock::now();
            s += delta;
            if (s != full) breach("full_so_far of " + id + " is not the concatenation of its deltas");
            if (order) order->push_back("text:" + id);
        };
        c.on_completed = [this](const std::string& id, const DoneInfo& d) {
            end(id);
            done[id] = d;
            if (d.id != id) breach("on_completed(" + id + ") carries done.id " + d.id);
            if (order) order->push_back("done:" + id);
            if (on_completed) on_completed(id, d);
        };
        c.on_failed = [this](const std::string& id, const std::string& code, const std::string& message) {
            end(id);
            failures[id] = {code, message};
        };
        c.on_connection_changed = [this](bool up) { connection.push_back(up); };
        c.on_error = [this](const std::string& id, const std::string& code, const std::string& message) {
            errors.push_back({id, code, message});
        };
        c.on_stats = [this](const Value& m) { stats.push_back(m); };
        c.on_pong = [this](double rtt) { pongs.push_back(rtt); };
        c.on_logprobs = [this](const std::string& id, const Value& entries) {
            for (size_t i = 0; i < entries.size(); i++) logprobs[id].push_back(entries.at(i));
        };
        c.on_snapshot = [this](const std::string& id, const SnapshotInfo& r) { reply(id, r.id); snapshots[id] = r; };
        c.on_restored = [this](const std::string& id, const RestoreInfo& r) { reply(id, r.id); restores[id] = r; };
        c.on_pinned = [this](const std::string& id, const PinInfo& r) { reply(id, r.id); pins[id] = r; };
        c.on_unpinned = [this](const std::string& id, const UnpinInfo& r) { reply(id, r.id); unpins[id] = r; };
        c.on_embeddings = [this](const std::string& id, const EmbeddingsInfo& r) { reply(id, r.id); embeddings[id] = r; };
    }
    void reply(const std::string& id, const std::string& reply_id) {
        end(id);
        if (reply_id != id) breach("the answer to " + id + " carries the id " + reply_id);
    }
    // "" when op `id` was answered (its answer is in `answers`), else why not
    template <class T>
    std::string answered(const std::string& id, const std::map<std::string, T>& answers) const {
        if (failures.count(id)) return id + " failed: " + failure(id);
        if (!answers.count(id)) return id + " got no answer of the expected kind";
        return "";
    }
    void end(const std::string& id) {
        if (!end_at.count(id)) end_at[id] = Clock::now();
        int n = ends[id]++;
        if (n > 0) breach(id + " ended " + std::to_string(n + 1) + " times");
    }
    void breach(const std::string& what) {
        if (bad.empty()) bad = what;
    }
    std::string text(const std::string& id) const {
        auto it = streamed.find(id);
        return it == streamed.end() ? std::string() : it->second;
    }
    bool ended(const std::string& id) const { return ends.count(id) > 0; }
    std::string failure(const std::string& id) const {
        auto it = failures.find(id);
        return it == failures.end() ? std::string() : it->second.first + ": " + it->second.second;
    }
    std::string conn_str() const {
        std::string s;
        for (size_t i = 0; i < connection.size(); i++) s += std::string(i ? "," : "") + (connection[i] ? "True" : "False");
        return s;
    }
    std::string errs() const {
        std::string s;
        for (auto& e : errors) s += e[0] + "|" + e[1] + "|" + e[2] + "; ";
        return s;
    }
};

std::string NoBreach(const Tracker& t) { return t.bad.empty() ? "" : "event contract broken: " + t.bad; }

std::string PumpUntil(Client& c, const std::function<bool()>& done, double timeout_s, const std::string& what) {
    auto t0 = Clock::now();
    while (!done()) {
        if (std::chrono::duration<double>(Clock::now() - t0).count() > timeout_s)
            return "timed out after " + F(timeout_s) + " s waiting for " + what + " (state " +
                   std::to_string(static_cast<int>(c.state())) + ", last error: " + c.last_error() + ")";
        c.poll(std::chrono::milliseconds(5));
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    return "";
}

void Settle(Client& c, int ms) {
    auto t0 = Clock::now();
    while (Clock::now() - t0 < std::chrono::milliseconds(ms)) {
        c.poll(std::chrono::milliseconds(5));
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
}

void sleep_ms(int ms) { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); }

ClientOptions Opts() {
    ClientOptions o;
    o.client_name = "cpp-conformance/0.1";
    return o;
}

std::string NewClient(Client& c, Tracker& t, ClientOptions o = Opts(), bool wait = true) {
    t.attach(c);
    c.connect(g_host, g_port, std::move(o));
    if (wait) return PumpUntil(c, [&] { return c.is_connected(); }, 30, "the welcome");
    return "";
}

GenerateOptions OptionsFrom(const Value& v) {
    GenerateOptions o;
    if (const std::string* s = v.get_string("id")) o.id = *s;
    if (const std::string* s = v.get_string("prompt")) o.prompt = *s;
    if (const Value* msgs = v.get_array("messages")) {
        std::vector<ChatMessage> list;
        for (size_t i = 0; i < msgs->size(); i++)
            list.push_back({*msgs->at(i).get_string("role"), *msgs->at(i).get_string("content")});
        o.messages = list;
    }
    o.max_tokens = v.get_int("max_tokens");
    o.temperature = v.get_double("temperature");
    o.top_k = v.get_int("top_k");
    o.top_p = v.get_double("top_p");
    o.min_p = v.get_double("min_p");
    if (auto s = v.get_int("seed")) o.seed = static_cast<uint64_t>(*s);
    if (const Value* stop = v.get_array("stop")) {
        std::vector<std::string> list;
        for (size_t i = 0; i < stop->size(); i++) list.push_back(stop->at(i).as_string());
        o.stop = list;
    }
    o.logprobs = v.get_int("logprobs");
    o.priority = v.get_int("priority");
    o.repetition_penalty = v.get_double("repetition_penalty");
    o.presence_penalty = v.get_double("presence_penalty");
    o.frequency_penalty = v.get_double("frequency_penalty");
    o.ignore_eos = v.get_bool("ignore_eos");
    o.max_tokens_per_s = v.get_double("max_tokens_per_s");
    o.ttft_deadline_ms = v.get_double("ttft_deadline_ms");
    if (const std::string* s = v.get_string("json_schema")) o.json_schema = *s;
    if (const std::string* s = v.get_string("regex")) o.regex = *s;
    if (const std::string* s = v.get_string("grammar")) o.grammar = *s;
    if (const Value* choice = v.get_array("choice")) {
        std::vector<std::string> list;
        for (size_t i = 0; i < choice->size(); i++) list.push_back(choice->at(i).as_string());
        o.choice = list;
    }
    o.cache_result = v.get_bool("cache_result");
    o.pin_prefix = v.get_bool("pin_prefix");
    return o;
}

GenerateOptions Long(const std::string& prompt, int max_tokens, const std::string& id = "") {
    GenerateOptions o;
    o.id = id;
    o.prompt = prompt;
    o.max_tokens = max_tokens;
    o.temperature = 0.0;
    o.ignore_eos = true;
    return o;
}

int ServerInt(const char* key) { return static_cast<int>(g_server->get_int(key).value_or(-1)); }

// ------------------------------------------------------------------------------------------ vectors
std::vector<uint8_t> Build(const std::string& name, const Value& v, bool& built) {
    built = true;
    const std::string op = v.get_string("op") ? *v.get_string("op") : "";
    if (name == "stats-request") return messages::stats_request();
    if (op == "hello") {
        const std::string* token = v.get_string("token");
        return messages::hello(*v.get_string("client"), token, static_cast<int>(*v.get_int("v")));
    }
    if (op == "generate") return messages::generate(*v.get_string("id"), OptionsFrom(v));
    if (op == "cancel") return messages::cancel(*v.get_string("id"));
    if (op == "ping") return messages::ping(*v.find("t"));
    if (op == "idle") return messages::idle(*v.get_double("ms"));
    if (op == "snapshot" && !v.find("blob")) {
        std::vector<int64_t> tokens;
        if (const Value* ts = v.get_array("tokens"))
            for (size_t i = 0; i < ts->size(); i++) tokens.push_back(ts->at(i).as_int());
        const std::string* conv = v.get_string("conversation");
        const std::string* enc = v.get_string("encoding");
        return messages::snapshot(*v.get_string("id"), conv ? *conv : "", tokens, enc ? *enc : "");
    }
    if (op == "pin") {
        std::vector<ChatMessage> msgs;
        std::vector<int64_t> tokens;
        if (const Value* ms = v.get_array("messages"))
            for (size_t i = 0; i < ms->size(); i++)
                msgs.push_back({*ms->at(i).get_string("role"), *ms->at(i).get_string("content")});
        if (const Value* ts = v.get_array("tokens"))
            for (size_t i = 0; i < ts->size(); i++) tokens.push_back(ts->at(i).as_int());
        return messages::pin(*v.get_string("id"), v.get_string("prompt"), v.get_array("messages") ? &msgs : nullptr,
                             v.get_array("tokens") ? &tokens : nullptr);
    }
    if (op == "unpin") return messages::unpin(*v.get_string("id"), *v.get_string("pin"));
    if (op == "embed") {
        std::vector<std::string> input;
        const Value* in = v.get_array("input");
        for (size_t i = 0; in && i < in->size(); i++) input.push_back(in->at(i).as_string());
        const std::string* pooling = v.get_string("pooling");
        return messages::embed(*v.get_string("id"), input, pooling ? *pooling : "");
    }
    if (op == "frame")
        return messages::frame(*v.get_double("ms"), v.get_double("target_ms"), v.get_double("max_ms"),
                               v.get_int("frames"), v.get_int("over"));
    built = false;
    return {};
}

std::string CheckServerMessage(const std::string& name, const Value& m) {
    const std::string op = m.get_string("op") ? *m.get_string("op") : "";
    if (op == "welcome") {
        WelcomeInfo w = WelcomeInfo::from_message(m);
        EQUAL(1, w.version, name + " v");
        EQUAL(*m.get_string("model"), w.model, name + " model");
        EQUAL(*m.get_int("max_seq_len"), w.max_seq_len, name + " max_seq_len");
        EQUAL(*m.get_int("lease_ms"), static_cast<int64_t>(w.lease_ms), name + " lease_ms");
        EQUAL(*m.get_int("max_inflight"), static_cast<int64_t>(w.max_inflight), name + " max_inflight");
        EQUAL(*m.get_int("max_message_bytes"), w.max_message_bytes, name + " max_message_bytes");
    } else if (op == "restored") {
        RestoreInfo r = RestoreInfo::from_message(m);
        EQUAL(*m.get_string("id"), r.id, name + " id");
        EQUAL(*m.get_int("tokens"), r.tokens, name + " tokens");
        EQUAL(*m.get_int("new_blocks"), r.new_blocks, name + " new_blocks");
    } else if (op == "pinned") {
        PinInfo r = PinInfo::from_message(m);
        EQUAL(*m.get_string("pin"), r.pin, name + " pin");
        EQUAL(*m.get_int("tokens"), r.tokens, name + " tokens");
    } else if (op == "unpinned") {
        UnpinInfo r = UnpinInfo::from_message(m);
        EQUAL(*m.get_string("pin"), r.pin, name + " pin");
        CHECK(*m.get_bool("found") == r.found, name + " found");
    } else if (op == "embeddings") {
        EmbeddingsInfo r = EmbeddingsInfo::from_message(m);
        const Value* vs = m.get_array("vectors");
        EQUAL(vs->size(), r.vectors.size(), name + " vectors");
        for (size_t i = 0; i < vs->size(); i++) {
            EQUAL(vs->at(i).size(), r.vectors[i].size(), name + " vector length");
            for (size_t j = 0; j < vs->at(i).size(); j++)
                CHECK(static_cast<float>(vs->at(i).at(j).as_double()) == r.vectors[i][j], name + " a vector value");
        }
        EQUAL(*m.get_int("prompt_tokens"), r.prompt_tokens, name + " prompt_tokens");
    } else if (op == "done") {
        DoneInfo d = DoneInfo::from_message(m);
        const Value* usage = m.get_map("usage");
        const Value* timings = m.get_map("timings");
        EQUAL(*m.get_string("id"), d.id, name + " id");
        EQUAL(*m.get_string("finish_reason"), d.finish_reason, name + " finish_reason");
        EQUAL(*m.get_string("text"), d.text, name + " text");
        EQUAL(*usage->get_int("prompt_tokens"), d.prompt_tokens, name + " prompt_tokens");
        EQUAL(*usage->get_int("completion_tokens"), d.completion_tokens, name + " completion_tokens");
        EQUAL(*usage->get_int("cached_tokens"), d.cached_tokens, name + " cached_tokens");
        CHECK(timings->get_double("ttft_ms") == d.ttft_ms, name + " ttft_ms");
        EQUAL(*timings->get_double("total_ms"), d.total_ms, name + " total_ms");
        CHECK(timings->get_bool("ttft_deadline_met") == d.ttft_deadline_met, name + " ttft_deadline_met");
    }
    return "";
}

std::string CheckZmtp(std::map<std::string, std::vector<uint8_t>>& v, int& count) {
    const char* known[] = {"zmtp-greeting", "zmtp-ready-dealer", "zmtp-ready-router", "zmtp-ping", "zmtp-pong",
                           "zmtp-frame-ping", "zmtp-frame-long-header", "zmtp-client-opening", "zmtp-frame-hello"};
    for (auto& kv : v) {
        bool ok = false;
        for (const char* k : known) ok = ok || kv.first == k;
        CHECK(ok, "ZMTP vector " + kv.first + " has no check in this runner");
    }
    for (const char* k : known) CHECK(v.count(k), std::string("PROTOCOL.md lacks the vector ") + k);
    TRY(SameBytes(v["zmtp-greeting"], zmtp::greeting(), "zmtp-greeting"));
    TRY(SameBytes(v["zmtp-ready-dealer"], zmtp::ready("DEALER"), "zmtp-ready-dealer"));
    TRY(SameBytes(v["zmtp-ready-router"], zmtp::ready("ROUTER"), "zmtp-ready-router"));
    TRY(SameBytes(v["zmtp-client-opening"], zmtp::client_opening(), "zmtp-client-opening"));
    TRY(SameBytes(v["zmtp-frame-ping"], zmtp::message_frame(messages::ping(Value::integer(17))), "zmtp-frame-ping"));
    TRY(SameBytes(v["zmtp-frame-hello"], zmtp::message_frame(messages::hello("unity/0.1")), "zmtp-frame-hello"));
    std::vector<uint8_t> header;
    zmtp::write_header(header, 0, 300);
    TRY(SameBytes(v["zmtp-frame-long-header"], header, "zmtp-frame-long-header"));
    std::vector<uint8_t> zeros(300, 0);
    std::vector<uint8_t> long_frame = zmtp::message_frame(zeros);
    TRY(SameBytes(v["zmtp-frame-long-header"], std::vector<uint8_t>(long_frame.begin(), long_frame.begin() + 9),
                  "a 300-byte message frame's header"));

    // What the server sends, fed one byte at a time: greeting, READY (ROUTER), PING, a long frame, a short one.
    std::vector<uint8_t> stream;
    for (const char* k : {"zmtp-greeting", "zmtp-ready-router", "zmtp-ping"})
        stream.insert(stream.end(), v[k].begin(), v[k].end());
    Value big = Value::map();
    big.set("op", Value::string("done"));
    big.set("text", Value::string(std::string(400, 'x')));
    std::vector<uint8_t> bigf = zmtp::message_frame(msgpack::encode(big));
    stream.insert(stream.end(), bigf.begin(), bigf.end());
    stream.insert(stream.end(), v["zmtp-frame-ping"].begin(), v["zmtp-frame-ping"].end());
    zmtp::Reader reader;
    std::string frames;
    for (size_t i = 0; i < stream.size(); i++) {
        reader.feed(&stream[i], 1);
        zmtp::Frame f;
        zmtp::Reader::Result r;
        while ((r = reader.next(f)) == zmtp::Reader::Result::Frame) {
            if (!frames.empty()) frames += ",";
            if (f.command()) {
                std::string cmd;
                size_t d = 0;
                CHECK(zmtp::command_name(f.body, f.size, cmd, d), "a malformed command");
                if (cmd == "READY") {
                    std::vector<std::pair<std::string, std::string>> props;
                    CHECK(zmtp::parse_properties(f.body + d, f.size - d, props), "READY properties");
                    CHECK(props.size() == 2, "READY has 2 properties");
                    EQUAL(std::string("ROUTER"), props[0].second, "READY Socket-Type");
                    EQUAL(std::string(""), props[1].second, "READY Identity");
                }
                if (cmd == "PING") TRY(SameBytes(v["zmtp-pong"], zmtp::pong(f.body + d + 2, f.size - d - 2), "zmtp-pong for zmtp-ping"));
                frames += cmd;
            } else {
                Value m;
                CHECK(msgpack::decode(f.body, f.size, m), "a message frame does not decode");
                const std::string* text = m.get_string("text");
                frames += *m.get_string("op") + ":" + std::to_string(text ? text->size() : 0);
            }
        }
        CHECK(r != zmtp::Reader::Result::Error, "the reader failed: " + reader.error());
    }
    EQUAL(std::string("READY,PING,done:400,ping:0"), frames, "frames parsed from the server's byte stream");
    CHECK(reader.greeting_done(), "the server greeting was not accepted");

    // Greetings a client must refuse (§2.1), and libzmq's padding with ZMTP 3.0, accepted.
    std::vector<uint8_t> g = zmtp::greeting();
    std::string err;
    std::vector<uint8_t> curve = g;
    std::copy_n("CURVE", 5, curve.begin() + 12);
    CHECK(!zmtp::check_greeting(curve.data(), &err) && err.find("CURVE") != std::string::npos, "a CURVE greeting was accepted");
    std::vector<uint8_t> not_zmtp = g;
    not_zmtp[0] = 0x48;
    CHECK(!zmtp::check_greeting(not_zmtp.data(), &err), "a greeting not starting with ff was accepted");
    std::vector<uint8_t> v2 = g;
    v2[10] = 2;
    CHECK(!zmtp::check_greeting(v2.data(), &err), "a ZMTP 2 greeting was accepted");
    std::vector<uint8_t> padded = g;
    padded[8] = 0x05;
    padded[11] = 0;
    CHECK(zmtp::check_greeting(padded.data(), &err), "libzmq's padded ZMTP 3.0 greeting was refused: " + err);
    zmtp::Reader r2;
    r2.feed(g.data(), g.size());
    std::vector<uint8_t> long_small = {0x02, 0, 0, 0, 0, 0, 0, 0, 3, 0x81, 0xa0, 0xc0};
    r2.feed(long_small.data(), long_small.size());
    zmtp::Frame f2;
    CHECK(r2.next(f2) == zmtp::Reader::Result::Frame && f2.size == 3, "a long-form header on a 3-byte body");
    count = static_cast<int>(v.size());
    return "";
}

std::string ExpectDecodeFails(const std::string& hex, const std::string& what) {
    std::vector<uint8_t> b = Hex(hex);
    Value out;
    CHECK(!msgpack::decode(b.data(), b.size(), out), what + " was accepted");
    return "";
}

Value Dec(const std::vector<uint8_t>& b) {
    Value v;
    msgpack::decode(b.data(), b.size(), v);
    return v;
}

std::string CodecEdges() {
    struct IntCase { Value v; const char* head; };
    std::vector<IntCase> ints = {
        {Value::integer(0), "00"}, {Value::integer(127), "7f"}, {Value::integer(128), "cc"}, {Value::integer(255), "cc"},
        {Value::integer(256), "cd"}, {Value::integer(65535), "cd"}, {Value::integer(65536), "ce"},
        {Value::integer(4294967295LL), "ce"}, {Value::integer(4294967296LL), "cf"},
        {Value::integer(INT64_MAX), "cf"}, {Value::uinteger(UINT64_MAX), "cf"}, {Value::integer(-1), "ff"},
        {Value::integer(-32), "e0"}, {Value::integer(-33), "d0"}, {Value::integer(-128), "d0"},
        {Value::integer(-129), "d1"}, {Value::integer(-32768), "d1"}, {Value::integer(-32769), "d2"},
        {Value::integer(-2147483648LL), "d2"}, {Value::integer(-2147483649LL), "d3"}, {Value::integer(INT64_MIN), "d3"},
    };
    for (auto& c : ints) {
        std::vector<uint8_t> b = msgpack::encode(c.v);
        char head[4];
        std::snprintf(head, sizeof head, "%02x", b[0]);
        EQUAL(std::string(c.head), std::string(head), "the header of " + json::serialize(c.v));
        CHECK(Dec(b).equals(c.v), json::serialize(c.v) + " round-trips");
    }
    CHECK(Dec(Hex("ca 3f c0 00 00")).equals(Value::number(1.5)), "float32 1.5");
    CHECK(Dec(Hex("d3 ff ff ff ff ff ff ff fb")).equals(Value::integer(-5)), "int64 -5 (not shortest) decodes");
    CHECK(Dec(Hex("cf 00 00 00 00 00 00 00 07")).equals(Value::integer(7)), "uint64 7 (not shortest) decodes");
    for (size_t n : {31u, 32u, 255u, 256u, 65535u, 65536u}) {
        Value s = Value::string(std::string(n, 'a'));
        std::vector<uint8_t> b = msgpack::encode(s);
        uint8_t head = n <= 31 ? 0xbf : n <= 255 ? 0xd9 : n <= 65535 ? 0xda : 0xdb;
        CHECK(b[0] == head, "the str header of " + std::to_string(n) + " bytes");
        CHECK(Dec(b).equals(s), "a " + std::to_string(n) + "-byte string round-trips");
    }
    Value list = Value::array();
    for (int i = 0; i < 16; i++) list.push(Value::integer(i));
    std::vector<uint8_t> lb = msgpack::encode(list);
    CHECK(lb[0] == 0xdc && Dec(lb).equals(list), "array16");
    Value map = Value::map();
    for (int i = 0; i < 16; i++) map.set("k" + std::to_string(i), Value::integer(i));
    std::vector<uint8_t> mb = msgpack::encode(map);
    CHECK(mb[0] == 0xde && Dec(mb).equals(map, true), "map16");
    Value utf = Value::string("\xc3\x87" "a \xf0\x9f\x90\x89");
    CHECK(Dec(msgpack::encode(utf)).equals(utf), "UTF-8 with a 4-byte character");
    TRY(ExpectDecodeFails("82 a2 6f 70", "truncated msgpack"));
    TRY(ExpectDecodeFails("c0 c0", "trailing bytes"));
    TRY(ExpectDecodeFails("dd 7f ff ff ff", "an absurd array length"));
    TRY(ExpectDecodeFails("81 01 02", "an integer map key"));
    TRY(ExpectDecodeFails("c1", "the never-used byte c1"));
    // JSON: the float/int convention, escapes, round trip.
    Value j;
    CHECK(json::parse("0.0", j) && j.equals(Value::number(0.0)), "JSON 0.0 is a float");
    CHECK(json::parse("7", j) && j.equals(Value::integer(7)), "JSON 7 is an int");
    std::string tricky = "{\"a\":\"q\\\"\\\\\\n\\u00e9\\ud83d\\udc09\",\"b\":[1,2.5,true,null,{}],\"c\":18446744073709551615}";
    CHECK(json::parse(tricky, j), "the tricky JSON parses");
    Value back;
    CHECK(json::parse(json::serialize(j), back) && back.equals(j, true), "JSON round trip");
    EQUAL(std::string("q\"\\\n\xc3\xa9\xf0\x9f\x90\x89"), *j.get_string("a"), "JSON escapes");
    CHECK(j.find("c")->equals(Value::uinteger(UINT64_MAX)), "JSON uint64");
    return "";
}

std::string Vectors() {
    const Value* vectors = g_spec.get_array("vectors");
    CHECK(vectors && vectors->size() >= 20, "the spec holds too few vectors");
    int n_msgpack = 0, built = 0, n_zmtp = 0;
    std::map<std::string, std::vector<uint8_t>> zb;
    for (size_t i = 0; i < vectors->size(); i++) {
        const Value& v = vectors->at(i);
        std::string name = *v.get_string("name");
        std::vector<uint8_t> bytes = Hex(*v.get_string("hex"));
        const std::string* js = v.get_string("json");
        if (!js) { zb[name] = bytes; continue; }
        n_msgpack++;
        Value expected, decoded;
        std::string err;
        CHECK(json::parse(*js, expected, &err), name + ": the JSON does not parse: " + err);
        CHECK(msgpack::decode(bytes.data(), bytes.size(), decoded, &err), name + ": the hex does not decode: " + err);
        CHECK(expected.equals(decoded), name + ": decodes to " + json::serialize(decoded) + ", not " + *js);
        CHECK(expected.equals(decoded, true), name + ": key order");
        TRY(SameBytes(bytes, msgpack::encode(expected), name + ": the JSON value encoded"));
        TRY(SameBytes(bytes, msgpack::encode(decoded), name + ": the decoded value re-encoded"));
        bool has_builder = false;
        std::vector<uint8_t> mine = Build(name, expected, has_builder);
        const std::string* op = expected.get_string("op");
        if (has_builder) {
            TRY(SameBytes(bytes, mine, name + ": the client's builder"));
            built++;
        } else if (op && (*op == "hello" || *op == "generate" || *op == "cancel" || *op == "ping" || *op == "frame" ||
                          *op == "idle" || *op == "pin" || *op == "unpin" || *op == "embed")) {
            return name + ": a client message vector with no builder check";
        }
        TRY(CheckServerMessage(name, expected));
    }
    CHECK(built >= 15, "only " + std::to_string(built) + " client vectors were built");
    TRY(CheckZmtp(zb, n_zmtp));
    TRY(CodecEdges());
    std::printf("METRIC vectors msgpack=%d built=%d zmtp=%d\n", n_msgpack, built, n_zmtp);
    return "";
}

// ------------------------------------------------------------------------------------------ server scenarios
std::string Handshake() {
    Tracker t;
    Client c;
    TRY(NewClient(c, t));
    WelcomeInfo w = *c.welcome();
    EQUAL(1, w.version, "welcome.v");
    EQUAL(static_cast<int64_t>(ServerInt("max_seq_len")), w.max_seq_len, "welcome.max_seq_len");
    EQUAL(ServerInt("lease_ms"), w.lease_ms, "welcome.lease_ms");
    EQUAL(ServerInt("max_inflight"), w.max_inflight, "welcome.max_inflight");
    EQUAL(static_cast<int64_t>(ServerInt("max_message_bytes")), w.max_message_bytes, "welcome.max_message_bytes");
    CHECK(!w.model.empty(), "welcome.model is empty");
    CHECK(w.server.rfind("gllm/", 0) == 0, "welcome.server is " + w.server);
    c.ping();
    TRY(PumpUntil(c, [&] { return t.pongs.size() == 1; }, 30, "the pong"));
    CHECK(t.pongs[0] >= 0, "a negative round trip");
    c.stats();
    TRY(PumpUntil(c, [&] { return t.stats.size() == 1; }, 30, "the stats"));
    const Value& s = t.stats[0];
    CHECK(s.get_int("clients").value_or(0) >= 1, "stats.clients");
    CHECK(s.get_int("inflight") == std::optional<int64_t>(0), "stats.inflight is not 0");
    CHECK(s.get_int("kv_total_blocks").value_or(0) > 0, "stats.kv_total_blocks");
    Settle(c, 100);
    EQUAL(std::string("True"), t.conn_str(), "on_connection_changed events");
    CHECK(t.errors.empty(), "unexpected errors: " + t.errs());
    std::printf("METRIC handshake rtt_ms=%s model=%s\n", F(t.pongs[0]).c_str(), w.model.c_str());
    return "";
}

std::string RefusedBy(uint16_t port, const std::string& why) {
    Tracker t;
    Client c;
    t.attach(c);
    ClientOptions o = Opts();
    o.handshake_timeout_ms = 500;
    o.reconnect_min_ms = 100;
    c.connect("127.0.0.1", port, o);
    std::string id = c.generate(Long("Anyone?", 4));
    TRY(PumpUntil(c, [&] { return t.ended(id); }, 30, "the refusal (" + why + ")"));
    CHECK(t.failures.count(id), "the request to a refusing peer did not fail (" + why + ")");
    EQUAL(std::string("disconnected"), t.failures[id].first, "its code (" + why + ")");
    CHECK(t.failures[id].second.find(why) != std::string::npos, "the failure does not say '" + why + "': " + t.failures[id].second);
    EQUAL(size_t(0), t.connection.size(), "on_connection_changed events from a refusing peer (" + why + ")");
    TRY(NoBreach(t));
    return "";
}

std::string FakePeers() {
    const Value* ports = g_spec.get_map("fake_peers");
    CHECK(ports && ports->size() >= 4, "the spec has no fake peers");
    TRY(RefusedBy(static_cast<uint16_t>(*ports->get_int("curve")), "CURVE"));
    TRY(RefusedBy(static_cast<uint16_t>(*ports->get_int("error")), "no entry"));
    TRY(RefusedBy(static_cast<uint16_t>(*ports->get_int("silent")), "no welcome"));
    Tracker t;
    Client c;
    t.attach(c);
    c.connect("127.0.0.1", static_cast<uint16_t>(*ports->get_int("scripted")), Opts());
    TRY(PumpUntil(c, [&] { return t.connection.size() == 1; }, 30, "the scripted peer's welcome"));
    WelcomeInfo w = *c.welcome();
    EQUAL(std::string("fake"), w.model, "the joined welcome's model");
    EQUAL(60000, w.lease_ms, "the joined welcome's lease_ms");
    EQUAL(4, w.max_inflight, "the joined welcome's max_inflight");
    std::string id = c.generate(Long("Hi", 2));
    TRY(PumpUntil(c, [&] { return t.ended(id); }, 30, "the scripted reply"));
    CHECK(t.done.count(id), "the scripted request failed: " + t.failure(id));
    DoneInfo& d = t.done[id];
    EQUAL(std::string("Hello"), d.text, "done.text joined from 3 MORE parts");
    EQUAL(std::string("Hello"), t.text(id), "the streamed text");
    EQUAL(std::string("stop"), d.finish_reason, "finish_reason");
    EQUAL(int64_t(3), d.cached_tokens, "cached_tokens");
    CHECK(!d.ttft_ms.has_value(), "ttft_ms nil");
    EQUAL(1.5, d.total_ms, "total_ms");
    CHECK(d.raw.find("extra") != nullptr, "the raw done keeps unknown keys");
    CHECK(!t.streamed.count("not-mine"), "text of an unknown id was delivered");
    c.stats();
    TRY(PumpUntil(c, [&] { return t.stats.size() == 1; }, 30, "the scripted stats"));
    const Value& s = t.stats[0];
    CHECK(s.get_int("pong_ok") == std::optional<int64_t>(1), "the PONG did not echo the PING's context");
    CHECK(s.get_int("hello_before_ready") == std::optional<int64_t>(0), "a message was sent before the server's READY");
    CHECK(s.get_string("client") && *s.get_string("client") == "cpp-conformance/0.1", "hello.client");
    CHECK(t.errors.empty(), "errors from ignorable input: " + t.errs());
    TRY(NoBreach(t));
    return "";
}

std::string CompareWithReference(Tracker& t, const Value& r) {
    std::string id = *r.get_string("id");
    CHECK(t.ended(id), id + " did not end");
    CHECK(!t.failures.count(id), id + " failed: " + t.failure(id));
    DoneInfo& d = t.done[id];
    EQUAL(d.text, t.text(id), id + ": the streamed text vs done.text");
    EQUAL(*r.get_string("expected_text"), d.text, id + ": the text vs the Python client's");
    EQUAL(*r.get_int("max_tokens"), d.completion_tokens, id + ": completion_tokens");
    EQUAL(std::string("length"), d.finish_reason, id + ": finish_reason");
    return "";
}

std::string ConcurrentGenerate(const Value& sc) {
    const Value* refs = sc.get_array("reference");
    CHECK(refs && refs->size() == 4, "4 reference requests expected");
    bool any = false;
    for (size_t i = 0; i < refs->size(); i++) any = any || !refs->at(i).get_string("expected_text")->empty();
    CHECK(any, "every reference text is empty");
    Tracker t;
    Client c;
    TRY(NewClient(c, t));
    for (size_t i = 0; i < refs->size(); i++)
        EQUAL(*refs->at(i).get_string("id"), c.generate(OptionsFrom(refs->at(i))), "generate's id");
    TRY(PumpUntil(c, [&] {
        for (size_t i = 0; i < refs->size(); i++) if (!t.ended(*refs->at(i).get_string("id"))) return false;
        return true; }, 120, "4 requests"));
    Settle(c, 200);
    for (size_t i = 0; i < refs->size(); i++) TRY(CompareWithReference(t, refs->at(i)));
    for (size_t i = 0; i < refs->size(); i++) {
        const Value& r = refs->at(i);
        std::string id = *r.get_string("id");
        auto want = r.get_int("logprobs");
        if (!want) {
            CHECK(!t.logprobs.count(id), id + " got logprobs it did not ask for");
            continue;
        }
        CHECK(t.logprobs.count(id), id + " got no logprobs");
        EQUAL(t.done[id].completion_tokens, static_cast<int64_t>(t.logprobs[id].size()), id + ": logprob entries");
        for (const Value& e : t.logprobs[id]) {
            CHECK(e.get_int("token").has_value() && e.find("logprob") && e.find("logprob")->is_float(),
                  id + ": a logprob entry " + json::serialize(e));
            CHECK(e.get_array("top") && static_cast<int64_t>(e.get_array("top")->size()) == *want, id + ": top alternatives");
        }
    }
    TRY(NoBreach(t));
    EQUAL(size_t(0), c.pending_requests(), "pending_requests after all ended");
    EQUAL(0, c.in_flight(), "in_flight after all ended");
    return "";
}

std::string CancelMidStream() {
    Tracker t;
    Client c;
    TRY(NewClient(c, t));
    std::string id = c.generate(Long("Once upon a time in Eldmoor", 200));
    TRY(PumpUntil(c, [&] { return !t.text(id).empty() || t.ended(id); }, 60, "the first text"));
    CHECK(!t.ended(id), "the request ended before it could be cancelled");
    c.cancel(id);
    TRY(PumpUntil(c, [&] { return t.ended(id); }, 60, "the cancelled request's end"));
    c.cancel(id);   // no longer in flight: ignored
    c.cancel("never-sent");
    c.ping();
    TRY(PumpUntil(c, [&] { return t.pongs.size() == 1; }, 30, "a pong after the cancels"));
    Settle(c, 100);
    CHECK(!t.failures.count(id), "the cancelled request failed instead of completing");
    DoneInfo& d = t.done[id];
    EQUAL(std::string("cancelled"), d.finish_reason, "finish_reason");
    CHECK(d.completion_tokens < 200, "completion_tokens " + std::to_string(d.completion_tokens) + " after a cancel");
    EQUAL(d.text, t.text(id), "the streamed text vs done.text");
    CHECK(t.errors.empty(), "unexpected errors: " + t.errs());
    TRY(NoBreach(t));
    return "";
}

std::string DuplicateId() {
    Tracker t;
    Client c;
    TRY(NewClient(c, t));
    c.generate(Long("The guard said", 60, "dup"));
    c.generate(Long("The guard said", 60, "dup"));
    TRY(PumpUntil(c, [&] { return t.ended("dup") && !t.errors.empty(); }, 60, "the request's end and the duplicate_id error"));
    Settle(c, 200);
    EQUAL(size_t(1), t.errors.size(), "errors");
    EQUAL(std::string("dup|duplicate_id"), t.errors[0][0] + "|" + t.errors[0][1], "the error");
    CHECK(!t.failures.count("dup"), "the original request failed: " + t.failure("dup"));
    DoneInfo& d = t.done["dup"];
    EQUAL(std::string("length"), d.finish_reason, "the original's finish_reason");
    EQUAL(int64_t(60), d.completion_tokens, "the original's completion_tokens");
    EQUAL(d.text, t.text("dup"), "the streamed text vs done.text");
    EQUAL(0, c.in_flight(), "in_flight (the duplicate has no end of its own)");
    TRY(NoBreach(t));
    return "";
}

std::string Busy() {
    Tracker t;
    Client c;
    TRY(NewClient(c, t));
    int max = c.welcome()->max_inflight;
    std::vector<std::string> ids;
    for (int i = 0; i <= max; i++) ids.push_back(c.generate(Long("Busy market day number " + std::to_string(i), 200)));
    std::string last = ids[static_cast<size_t>(max)];
    TRY(PumpUntil(c, [&] { return t.ended(last); }, 60, "the busy answer"));
    CHECK(t.failures.count(last), "request " + std::to_string(max + 1) + " of " + std::to_string(max + 1) + " did not fail");
    EQUAL(std::string("busy"), t.failures[last].first, "its code");
    for (int i = 0; i < max; i++) c.cancel(ids[static_cast<size_t>(i)]);
    TRY(PumpUntil(c, [&] { for (auto& id : ids) if (!t.ended(id)) return false; return true; }, 120, "the cancelled requests"));
    Settle(c, 200);
    bool any_cancelled = false;
    for (int i = 0; i < max; i++) {
        const std::string& id = ids[static_cast<size_t>(i)];
        CHECK(!t.failures.count(id), id + " failed: " + t.failure(id));
        EQUAL(t.done[id].text, t.text(id), id + ": the streamed text vs done.text");
        any_cancelled = any_cancelled || t.done[id].finish_reason == "cancelled";
    }
    CHECK(any_cancelled, "no request was cancelled");
    EQUAL(0, c.in_flight(), "in_flight after all ended");
    TRY(NoBreach(t));
    return "";
}

std::string LongFrame(const Value& sc) {
    const Value& r = sc.get_array("reference")->at(0);
    GenerateOptions o = OptionsFrom(r);
    size_t size = messages::generate(o.id, o).size();
    CHECK(size > 255, "the request is only " + std::to_string(size) + " bytes: not a long frame");
    Tracker t;
    Client c;
    TRY(NewClient(c, t));
    c.generate(o);
    TRY(PumpUntil(c, [&] { return t.ended(o.id); }, 60, "the request"));
    TRY(CompareWithReference(t, r));
    TRY(NoBreach(t));
    std::printf("METRIC long-frame request_bytes=%zu\n", size);
    return "";
}

std::string Errors() {
    Tracker t;
    Client c;
    TRY(NewClient(c, t));
    GenerateOptions bad_o;
    bad_o.prompt = "Hello";
    bad_o.temperature = -1.0;
    bad_o.max_tokens = 4;
    std::string bad = c.generate(bad_o);
    GenerateOptions huge_o;
    std::string p;
    for (int i = 0; i < 120; i++) p += "the dragon sleeps under the hill ";
    huge_o.prompt = p;
    huge_o.max_tokens = 4;
    std::string huge = c.generate(huge_o);
    TRY(PumpUntil(c, [&] { return t.ended(bad) && t.ended(huge); }, 60, "the two errors"));
    CHECK(t.failures.count(bad), "the bad request did not fail");
    EQUAL(std::string("bad_request"), t.failures[bad].first, "the bad request's code");
    CHECK(t.failures[bad].second.find("temperature") != std::string::npos, "the message does not name the field: " + t.failures[bad].second);
    CHECK(t.failures.count(huge), "the too-long request did not fail");
    EQUAL(std::string("too_long"), t.failures[huge].first, "the long prompt's code");
    std::string ok = c.generate(Long("Afterwards", 4));
    TRY(PumpUntil(c, [&] { return t.ended(ok); }, 60, "a request after the errors"));
    CHECK(t.done.count(ok), "the request after the errors did not complete");
    Settle(c, 100);
    EQUAL(std::string("True"), t.conn_str(), "on_connection_changed events");
    TRY(NoBreach(t));
    return "";
}

const char* kLore =
    "You are a character in Eldmoor, a cold river town ruled by Duke Aldric from the grey keep on the "
    "hill. The old stone bridge is guarded by river spirits, the north road is closed since the dragon woke, "
    "merchants trade furs and salt at the market, and the bards sing of the fallen king every night at the inn.";

std::string WarmupFrameStats() {
    Tracker t;
    Client c;
    TRY(NewClient(c, t));
    std::string w = c.warmup({ChatMessage::system(kLore), ChatMessage::user("Hello.")});
    TRY(PumpUntil(c, [&] { return t.ended(w); }, 60, "the warmup"));
    CHECK(t.done.count(w), "the warmup did not complete: " + t.failure(w));
    CHECK(t.done[w].completion_tokens <= 1, "the warmup generated " + std::to_string(t.done[w].completion_tokens) + " tokens");
    GenerateOptions o;
    o.messages = std::vector<ChatMessage>{ChatMessage::system(kLore), ChatMessage::user("Who rules the town?")};
    o.max_tokens = 4;
    o.temperature = 0.0;
    std::string id = c.generate(o);
    for (int i = 0; i < 12; i++) {
        c.report_frame(16.0 + i % 3, 16.6);
        c.poll(std::chrono::milliseconds(1));
        sleep_ms(30);
    }
    TRY(PumpUntil(c, [&] { return t.ended(id); }, 60, "the request after the warmup"));
    CHECK(t.done.count(id), "the request after the warmup did not complete");
    CHECK(t.done[id].cached_tokens > 0, "cached_tokens is 0: the warmup did not fill the prefix cache");
    c.stats();
    TRY(PumpUntil(c, [&] { return t.stats.size() == 1; }, 30, "the stats"));
    CHECK(t.stats[0].get_int("prefix_cache_hits").value_or(0) > 0, "stats.prefix_cache_hits is 0");
    Settle(c, 100);
    CHECK(t.errors.empty(), "errors after frame reports: " + t.errs());
    // Frames running over while a long request runs: every frame 30 ms against 16.6, one report_frame per 16 ms
    // frame for 2 s. Each report carries max_ms, frames and over (all of them over): the engine yields.
    std::string slow = c.generate(Long("The long winter in Eldmoor", 200));
    TRY(PumpUntil(c, [&] { return !t.text(slow).empty() || t.ended(slow); }, 60, "the long request's first text"));
    CHECK(!t.ended(slow), "the long request ended before the frame reports: " + t.failure(slow));
    auto f0 = Clock::now();
    int frames = 0;
    while (Clock::now() - f0 < std::chrono::seconds(2)) {
        c.report_frame(30.0, 16.6);
        c.poll(std::chrono::milliseconds(1));
        frames++;
        auto next = f0 + std::chrono::milliseconds(16 * frames);
        auto now = Clock::now();
        if (next > now) std::this_thread::sleep_for(next - now);
    }
    c.stats();
    TRY(PumpUntil(c, [&] { return t.stats.size() == 2; }, 30, "the stats after the slow frames"));
    std::optional<double> duty = t.stats[1].get_double("governor_duty_pct");
    CHECK(duty.has_value(), "stats has no governor_duty_pct: " + json::serialize(t.stats[1]));
    CHECK(*duty < 100, "governor_duty_pct is " + F(*duty) + " after 2 s of frames over their target: the engine did "
                       "not yield");
    c.cancel(slow);
    TRY(PumpUntil(c, [&] { return t.ended(slow); }, 60, "the long request's end after the cancel"));
    Settle(c, 100);
    CHECK(t.done.count(slow), "the long request failed: " + t.failure(slow));
    CHECK(t.done[slow].finish_reason == "cancelled" || t.done[slow].finish_reason == "length",
          "the long request's finish_reason: " + t.done[slow].finish_reason);
    EQUAL(t.done[slow].text, t.text(slow), "the long request's streamed text vs done.text");
    CHECK(t.errors.empty(), "errors after the slow frame reports: " + t.errs());
    EQUAL(0, c.in_flight(), "in_flight after the cancel");
    TRY(NoBreach(t));
    std::printf("METRIC warmup-frame-stats cached_tokens=%lld prompt_tokens=%lld slow_frames=%d governor_duty_pct=%s "
                "slow_finish=%s slow_tokens=%lld\n",
                static_cast<long long>(t.done[id].cached_tokens), static_cast<long long>(t.done[id].prompt_tokens),
                frames, F(*duty).c_str(), t.done[slow].finish_reason.c_str(),
                static_cast<long long>(t.done[slow].completion_tokens));
    return "";
}

std::string PacingDeadline() {
    Tracker t;
    Client c;
    TRY(NewClient(c, t));
    GenerateOptions o = Long("The bard of Eldmoor began her song", 20);
    o.max_tokens_per_s = 25.0;
    o.ttft_deadline_ms = 60000.0;
    std::string paced = c.generate(o);
    GenerateOptions fast = Long("Too fast", 4);
    fast.max_tokens_per_s = 5000.0;
    std::string too_fast = c.generate(fast);
    GenerateOptions late = Long("Before ever", 4);
    late.ttft_deadline_ms = -1.0;
    std::string negative = c.generate(late);
    TRY(PumpUntil(c, [&] { return t.ended(paced) && t.ended(too_fast) && t.ended(negative); }, 60,
                  "the paced request and the two bad ones"));
    Settle(c, 100);
    CHECK(t.done.count(paced), "the paced request failed: " + t.failure(paced));
    const DoneInfo& d = t.done[paced];
    EQUAL(std::string("length"), d.finish_reason, "the paced request's finish_reason");
    EQUAL(int64_t(20), d.completion_tokens, "the paced request's completion_tokens");
    EQUAL(d.text, t.text(paced), "the paced request's streamed text vs done.text");
    CHECK(d.ttft_deadline_met.has_value(), "the paced request's done.timings has no ttft_deadline_met");
    CHECK(*d.ttft_deadline_met, "ttft_deadline_met is false with a 60 s deadline");
    CHECK(t.first_text_at.count(paced), "the paced request streamed no text");
    double span_s = std::chrono::duration<double>(t.end_at[paced] - t.first_text_at[paced]).count();
    CHECK(span_s >= 0.6, "the paced request's first text to its end took " + F(span_s) +
                         " s: 19 tokens at 25 a second take 0.76 s (not paced?)");
    const std::pair<std::string, const char*> bad[] = {{too_fast, "max_tokens_per_s"}, {negative, "ttft_deadline_ms"}};
    for (const auto& b : bad) {
        CHECK(t.failures.count(b.first), std::string("the request with a bad ") + b.second + " did not fail");
        EQUAL(std::string("bad_request"), t.failures[b.first].first, std::string("the code for a bad ") + b.second);
        CHECK(t.failures[b.first].second.find(b.second) != std::string::npos,
              std::string("the message does not name ") + b.second + ": " + t.failures[b.first].second);
    }
    CHECK(t.errors.empty(), "unexpected errors: " + t.errs());
    EQUAL(0, c.in_flight(), "in_flight after all ended");
    TRY(NoBreach(t));
    std::printf("METRIC pacing-deadline first_text_to_done_s=%s ttft_ms=%s total_ms=%s\n", F(span_s).c_str(),
                d.ttft_ms ? F(*d.ttft_ms).c_str() : "nil", F(d.total_ms).c_str());
    return "";
}

std::string Npc() {
    Tracker t;
    Client c;
    TRY(NewClient(c, t));
    NpcConversation npc("guard", "You are Brann, a tired town guard of Eldmoor.");
    npc.settings = GenerateOptions();
    npc.settings.max_tokens = 8;
    npc.settings.temperature = 0.0;
    npc.settings.ignore_eos = true;
    std::string id = npc.say(c, "Halt! Who goes there?");
    EQUAL(id, npc.active_request_id(), "active_request_id");
    TRY(PumpUntil(c, [&] { return t.ended(id); }, 60, "the reply"));
    CHECK(t.done.count(id), "the reply did not complete");
    CHECK(npc.active_request_id().empty(), "active_request_id after the reply");
    EQUAL(size_t(2), npc.history.size(), "history entries");
    EQUAL(std::string("assistant"), npc.history[1].role, "the reply's role");
    EQUAL(t.done[id].text, npc.history[1].content, "the reply in the history");
    EQUAL(t.text(id), npc.history[1].content, "the streamed reply");
    // A history far over max_seq_len: sent untrimmed the server refuses it; say() trims it to fit.
    for (int i = 0; i < 30; i++) {
        npc.history.push_back(ChatMessage::user("Tell me again about the dragon on the north road, turn " + std::to_string(i) + ", all of it."));
        npc.history.push_back(ChatMessage::assistant("The dragon sleeps in the hills past the old watchtower, and the road is closed, turn " + std::to_string(i) + "."));
    }
    size_t before = npc.history.size();
    std::vector<ChatMessage> untrimmed = npc.build_messages();
    untrimmed.push_back(ChatMessage::user("And now?"));
    GenerateOptions raw_o;
    raw_o.messages = untrimmed;
    raw_o.max_tokens = 8;
    std::string raw = c.generate(raw_o);
    std::string trimmed = npc.say(c, "And now?");
    TRY(PumpUntil(c, [&] { return t.ended(raw) && t.ended(trimmed); }, 60, "the untrimmed and trimmed requests"));
    CHECK(t.failures.count(raw) && t.failures[raw].first == "too_long", "the untrimmed chat was not refused as too_long");
    CHECK(t.done.count(trimmed), "the trimmed chat failed: " + t.failure(trimmed));
    CHECK(npc.history.size() < before, "nothing was trimmed");
    EQUAL(std::string("user"), npc.history[0].role, "the trimmed history starts with");
    EQUAL(t.done[trimmed].text, npc.history.back().content, "the reply after trimming");
    CHECK(t.done[trimmed].prompt_tokens + 8 <= c.welcome()->max_seq_len, "the trimmed prompt does not fit");
    // Save and load.
    npc.history.push_back(ChatMessage::user("\xc3\x87" "a va? \"quoted\"\nnew line \xf0\x9f\x90\x89"));
    std::string js = npc.to_json();
    NpcConversation loaded;
    std::string err;
    CHECK(NpcConversation::from_json(js, loaded, &err), "from_json failed: " + err);
    EQUAL(js, loaded.to_json(), "to_json after from_json");
    EQUAL(npc.history.size(), loaded.history.size(), "history entries after loading");
    EQUAL(npc.history.back().content, loaded.history.back().content, "the last entry after loading");
    EQUAL(npc.system_prompt, loaded.system_prompt, "the persona after loading");
    TRY(NoBreach(t));
    std::printf("METRIC npc-conversation trimmed_from=%zu trimmed_to=%zu prompt_tokens=%lld\n", before,
                npc.history.size() - 2, static_cast<long long>(t.done[trimmed].prompt_tokens));
    return "";
}

std::string PollBudget() {
    Tracker t;
    std::vector<std::string> order;
    Client c;
    TRY(NewClient(c, t));
    Settle(c, 50);
    t.order = &order;
    std::string a = c.generate(Long("Budget story one", 24, "pb-a"));
    std::string b = c.generate(Long("Budget story two", 24, "pb-b"));
    auto t0 = Clock::now();
    while (c.in_flight() > 0) {   // no poll: everything stays queued
        CHECK(Clock::now() - t0 < std::chrono::seconds(60), "the requests did not end within 60 s");
        sleep_ms(10);
    }
    EQUAL(size_t(0), order.size(), "events dispatched without poll");
    int calls = 0;
    while (true) {
        int n = c.poll(std::chrono::microseconds(0));
        if (n == 0) break;
        EQUAL(1, n, "events dispatched by poll(0)");
        CHECK(++calls <= 100, "poll(0) keeps dispatching");
    }
    EQUAL(4, calls, "poll(0) calls with an event (two merged texts, two ends)");
    auto idx = [&](const std::string& s) {
        auto it = std::find(order.begin(), order.end(), s);
        return it == order.end() ? -1 : static_cast<int>(it - order.begin());
    };
    CHECK(idx("text:" + a) >= 0 && idx("text:" + a) < idx("done:" + a), "a's text, then its end");
    CHECK(idx("text:" + b) >= 0 && idx("text:" + b) < idx("done:" + b), "b's text, then its end");
    for (const std::string& id : {a, b}) {
        EQUAL(int64_t(24), t.done[id].completion_tokens, id + ": completion_tokens");
        EQUAL(t.done[id].text, t.text(id), id + ": the one merged text vs done.text");
    }
    EQUAL(0, c.poll(std::chrono::milliseconds(100)), "events left");
    EQUAL(size_t(0), c.pending_requests(), "pending_requests");
    t.order = nullptr;
    TRY(NoBreach(t));
    return "";
}

std::string LeaseStall() {
    Tracker t;
    Client c;
    TRY(NewClient(c, t));
    int lease = c.welcome()->lease_ms;
    std::string id = c.generate(Long("The long night in Eldmoor", 200));
    TRY(PumpUntil(c, [&] { return !t.text(id).empty(); }, 60, "the first text"));
    int stall = lease * 3 / 2 + 500;
    sleep_ms(stall);   // the main thread stalls: no poll, as in a scene load
    c.stats();         // answered only if the session is still there
    TRY(PumpUntil(c, [&] { return t.ended(id) && t.stats.size() == 1; }, 60, "the request's end and the stats"));
    Settle(c, 100);
    CHECK(t.done.count(id), "the request failed during the stall: " + t.failure(id));
    EQUAL(std::string("length"), t.done[id].finish_reason, "finish_reason");
    EQUAL(t.done[id].text, t.text(id), "the streamed text vs done.text");
    EQUAL(std::string("True"), t.conn_str(), "on_connection_changed events");
    EQUAL(int64_t(0), c.reconnects(), "reconnects");
    CHECK(t.errors.empty(), "unexpected errors: " + t.errs());
    TRY(NoBreach(t));
    std::printf("METRIC lease-stall lease_ms=%d stall_ms=%d\n", lease, stall);
    return "";
}

std::string SessionDropped() {
    Tracker t;
    Client c;
    ClientOptions o = Opts();
    o.send_keepalives = false;
    TRY(NewClient(c, t, o));
    int lease = c.welcome()->lease_ms;
    std::vector<std::string> ids;
    for (int i = 0; i < 4; i++) ids.push_back(c.generate(Long("A silent client number " + std::to_string(i), 240)));
    TRY(PumpUntil(c, [&] { for (auto& id : ids) if (t.text(id).empty() && !t.ended(id)) return false; return true; },
                  60, "the first texts"));
    auto t0 = Clock::now();
    while (Clock::now() - t0 < std::chrono::milliseconds(lease + 1000)) { c.poll(std::chrono::milliseconds(5)); sleep_ms(5); }
    std::string late = c.generate(Long("Anyone still listening?", 8));   // answered with no_session
    ids.push_back(late);
    TRY(PumpUntil(c, [&] { for (auto& id : ids) if (!t.ended(id)) return false; return t.connection.size() >= 3; },
                  60, "the failures and the reconnect"));
    CHECK(t.failures.count(late), std::string("the request sent after the lease expired did not fail") +
                                      (t.done.count(late) ? " (it completed: the server kept the silent session)" : ""));
    int failed = 0;
    for (auto& id : ids) {
        if (t.failures.count(id)) {
            failed++;
            EQUAL(std::string("disconnected"), t.failures[id].first, id + "'s code");
            CHECK(t.failures[id].second.find("session") != std::string::npos, id + "'s message does not say why: " + t.failures[id].second);
        } else {
            EQUAL(std::string("length"), t.done[id].finish_reason, id + ": finish_reason");
            EQUAL(t.done[id].text, t.text(id), id + ": streamed vs done");
        }
    }
    EQUAL(std::string("True,False,True"), t.conn_str(), "on_connection_changed events");
    CHECK(c.reconnects() >= 1, "no reconnect");
    EQUAL(0, c.in_flight(), "in_flight after the drop");
    std::string after = c.generate(Long("Back again", 8));
    TRY(PumpUntil(c, [&] { return t.ended(after); }, 60, "a request after the reconnect"));
    CHECK(t.done.count(after), "the request after the reconnect failed: " + t.failure(after));
    TRY(NoBreach(t));
    std::printf("METRIC session-dropped failed=%d completed=%d\n", failed, static_cast<int>(ids.size()) - failed);
    return "";
}

std::string ServerRestart(const Value& sc) {
    const Value& r = sc.get_array("reference")->at(0);
    Tracker t;
    Client c;
    ClientOptions o = Opts();
    o.reconnect_min_ms = 100;
    o.reconnect_max_ms = 1000;
    TRY(NewClient(c, t, o));
    std::vector<std::string> ids;
    for (int i = 0; i < 3; i++) ids.push_back(c.generate(Long("Before the restart, story " + std::to_string(i), 240)));
    TRY(PumpUntil(c, [&] { for (auto& id : ids) if (t.text(id).empty() && !t.ended(id)) return false; return true; },
                  60, "the first texts"));
    for (auto& id : ids) CHECK(!t.ended(id), "a request ended before the restart");
    std::printf("@@ restart-server\n");
    std::fflush(stdout);
    std::string reply;
    std::getline(std::cin, reply);   // the main thread blocks meanwhile: the I/O thread goes on
    while (!reply.empty() && (reply.back() == '\r' || reply.back() == ' ')) reply.pop_back();
    CHECK(reply == "@@ restarted", "the harness did not restart the server: " + reply);
    TRY(PumpUntil(c, [&] { for (auto& id : ids) if (!t.ended(id)) return false; return t.connection.size() >= 3; },
                  90, "the failures and the reconnect"));
    for (auto& id : ids) {
        CHECK(t.failures.count(id), id + " did not fail");
        EQUAL(std::string("disconnected"), t.failures[id].first, id + "'s code");
    }
    EQUAL(std::string("True,False,True"), t.conn_str(), "on_connection_changed events");
    GenerateOptions ro = OptionsFrom(r);
    c.generate(ro);
    TRY(PumpUntil(c, [&] { return t.ended(ro.id); }, 60, "a request after the restart"));
    TRY(CompareWithReference(t, r));
    TRY(NoBreach(t));
    std::printf("METRIC server-restart reconnects=%lld\n", static_cast<long long>(c.reconnects()));
    return "";
}

// ------------------------------------------------------------------------------ NPC memory, idle, structured
std::string StatsValue(Client& c, Tracker& t, const char* key, int64_t& out) {
    size_t n = t.stats.size();
    c.stats();
    TRY(PumpUntil(c, [&] { return t.stats.size() > n; }, 30, "the stats"));
    auto v = t.stats.back().get_int(key);
    CHECK(v.has_value(), std::string("stats carries no ") + key + ": " + json::serialize(t.stats.back()));
    out = *v;
    return "";
}

bool Contains(const std::string& s, const char* part) { return s.find(part) != std::string::npos; }

std::string IdleWindow() {
    Tracker t;
    Client c;
    TRY(NewClient(c, t));
    int64_t before = 0, after = 0, steps = 0, steps_after = 0;
    TRY(StatsValue(c, t, "window_reports", before));
    for (int i = 0; i < 3; i++) c.report_idle(4.0);
    c.report_idle(-1.0);
    c.report_idle(std::nan(""));
    TRY(StatsValue(c, t, "window_reports", after));
    EQUAL(before + 3, after, "window_reports after 3 report_idle (and 2 invalid)");
    TRY(StatsValue(c, t, "window_steps", steps));
    std::string id = c.generate(Long("In the idle windows the engine", 8));
    auto t0 = Clock::now();
    while (!t.ended(id)) {
        CHECK(Clock::now() - t0 < std::chrono::seconds(60), "timed out waiting for the generate inside idle windows");
        sleep_ms(4);                  // the frame's work
        c.poll(std::chrono::milliseconds(1));
        c.report_idle(12.0);          // the rest of the 16 ms frame is the engine's
        sleep_ms(12);
    }
    CHECK(t.done.count(id), "the generate inside idle windows did not complete: " + t.failure(id));
    EQUAL(int64_t{8}, t.done[id].completion_tokens, "completion_tokens inside idle windows");
    TRY(StatsValue(c, t, "window_steps", steps_after));
    CHECK(steps_after > steps, "window_steps did not grow (" + std::to_string(steps) + " -> " +
                                   std::to_string(steps_after) + "): the engine did not step in the windows");
    TRY(NoBreach(t));
    return "";
}

std::string StructuredOutput(const Value& sc) {
    const Value* refs = sc.get_array("reference");
    Tracker t;
    Client c;
    TRY(NewClient(c, t));
    std::vector<std::string> ids;
    for (size_t i = 0; i < refs->size(); i++) ids.push_back(c.generate(OptionsFrom(refs->at(i))));
    GenerateOptions bs;
    bs.prompt = "x";
    bs.max_tokens = 4;
    bs.json_schema = "{not json";
    std::string bad_schema = c.generate(bs);
    GenerateOptions two;
    two.prompt = "x";
    two.max_tokens = 4;
    two.regex = "[0-9]";
    two.choice = std::vector<std::string>{"a"};
    std::string two_at_once = c.generate(two);
    ids.push_back(bad_schema);
    ids.push_back(two_at_once);
    TRY(PumpUntil(c, [&] { for (auto& id : ids) if (!t.ended(id)) return false; return true; }, 120,
                  "the structured requests"));
    for (size_t i = 0; i < refs->size(); i++) {
        const Value& r = refs->at(i);
        std::string id = *r.get_string("id");
        CHECK(t.done.count(id), id + " failed: " + t.failure(id));
        const DoneInfo& d = t.done[id];
        EQUAL(std::string("stop"), d.finish_reason, id + ": finish_reason");
        EQUAL(d.text, t.text(id), id + ": the streamed text vs done.text");
        EQUAL(*r.get_string("expected_text"), d.text, id + ": the text vs the Python client's");
        if (r.get_string("json_schema")) {
            Value obj;
            std::string err;
            CHECK(json::parse(d.text, obj, &err) && obj.is_map(), id + ": the text is not a JSON object: " + d.text);
            const std::string* action = obj.get_string("action");
            const std::string* mood = obj.get_string("mood");
            CHECK(action && (*action == "open_gate" || *action == "wait"), id + ": action in " + d.text);
            CHECK(mood && (*mood == "calm" || *mood == "angry"), id + ": mood in " + d.text);
        } else if (const Value* choice = r.get_array("choice")) {
            bool one = false;
            for (size_t j = 0; j < choice->size(); j++) one = one || choice->at(j).as_string() == d.text;
            CHECK(one, id + ": " + Q(d.text) + " is not one of the choices");
        } else {
            const std::string& x = d.text;
            CHECK(x.size() == 5 && std::isdigit(static_cast<unsigned char>(x[0])) &&
                      std::isdigit(static_cast<unsigned char>(x[1])) && x[2] == '-' &&
                      std::isdigit(static_cast<unsigned char>(x[3])) && std::isdigit(static_cast<unsigned char>(x[4])),
                  id + ": " + Q(x) + " does not match the regex");
        }
    }
    CHECK(t.failures.count(bad_schema), "the malformed json_schema did not fail");
    EQUAL(std::string("bad_request"), t.failures[bad_schema].first, "the malformed json_schema's code");
    CHECK(Contains(t.failures[bad_schema].second, "json_schema"), "the message does not name json_schema: " + t.failure(bad_schema));
    CHECK(t.failures.count(two_at_once), "regex with choice did not fail");
    EQUAL(std::string("bad_request"), t.failures[two_at_once].first, "regex with choice: the code");
    CHECK(Contains(t.failures[two_at_once].second, "regex") && Contains(t.failures[two_at_once].second, "choice"),
          "the message does not name regex and choice: " + t.failure(two_at_once));
    std::string ok = c.generate(Long("Still serving", 4));
    TRY(PumpUntil(c, [&] { return t.ended(ok); }, 60, "a request after the errors"));
    CHECK(t.done.count(ok), "the request after the errors did not complete");
    TRY(NoBreach(t));
    return "";
}

const char* kPinnedPrompt =
    "The river spirits guard the old stone bridge of Eldmoor, and every traveller who "
    "crosses it after dark leaves a copper coin on the parapet for them.";

std::string PinUnpin(const Value& sc) {
    std::vector<ChatMessage> lore;
    const Value* l = sc.get_array("lore");
    for (size_t i = 0; i < l->size(); i++) lore.push_back({*l->at(i).get_string("role"), *l->at(i).get_string("content")});
    Tracker t;
    Client c;
    TRY(NewClient(c, t));
    std::string p1 = c.pin(lore);
    TRY(PumpUntil(c, [&] { return t.ended(p1); }, 60, "the pin"));
    TRY(t.answered(p1, t.pins));
    PinInfo pin = t.pins[p1];
    CHECK(pin.pin.rfind("pin-", 0) == 0 && pin.tokens > 0, "pinned " + pin.pin + " of " + std::to_string(pin.tokens) + " tokens");
    int64_t pins = -1, blocks = -1;
    TRY(StatsValue(c, t, "pins", pins));
    EQUAL(int64_t{1}, pins, "stats pins after pin");
    TRY(StatsValue(c, t, "pinned_blocks", blocks));
    CHECK(blocks > 0, "stats pinned_blocks is 0 after pin");
    std::string p2 = c.pin(lore);
    TRY(PumpUntil(c, [&] { return t.ended(p2); }, 60, "the second pin"));
    TRY(t.answered(p2, t.pins));
    EQUAL(pin.pin, t.pins[p2].pin, "the same lore's pin name");
    std::string u1 = c.unpin(pin.pin), u2 = c.unpin(pin.pin);
    TRY(PumpUntil(c, [&] { return t.ended(u1) && t.ended(u2); }, 60, "the unpins"));
    TRY(t.answered(u1, t.unpins));
    TRY(t.answered(u2, t.unpins));
    CHECK(t.unpins[u1].found && t.unpins[u1].pin == pin.pin, "the first unpin did not find the pin");
    CHECK(!t.unpins[u2].found, "the second unpin found the pin");
    TRY(StatsValue(c, t, "pins", pins));
    EQUAL(int64_t{0}, pins, "stats pins after unpin");
    std::vector<int64_t> many;
    for (int i = 0; i < ServerInt("max_seq_len") + 44; i++) many.push_back(1000 + i);
    std::string big = c.pin_tokens(many);
    std::string pp = c.pin_prompt(kPinnedPrompt);
    TRY(PumpUntil(c, [&] { return t.ended(big) && t.ended(pp); }, 60, "pin_tokens and pin_prompt"));
    CHECK(t.failures.count(big), "a pin longer than max_seq_len did not fail");
    EQUAL(std::string("too_long"), t.failures[big].first, "the long pin's code");
    TRY(t.answered(pp, t.pins));
    const PinInfo& prompt = t.pins[pp];
    CHECK(prompt.tokens > 0 && prompt.pin != pin.pin, "pin_prompt: " + prompt.pin + " of " + std::to_string(prompt.tokens) + " tokens");
    std::string u3 = c.unpin(prompt.pin);
    TRY(PumpUntil(c, [&] { return t.ended(u3); }, 60, "the prompt's unpin"));
    TRY(t.answered(u3, t.unpins));
    CHECK(t.unpins[u3].found, "the prompt's pin was not found");
    TRY(StatsValue(c, t, "pins", pins));
    EQUAL(int64_t{0}, pins, "stats pins at the end");
    EQUAL(0, c.in_flight(), "in_flight after every op ended");
    TRY(NoBreach(t));
    return "";
}

std::string Embed(const Value& sc) {
    const Value* er = sc.get_map("embed_reference");
    const Value* in = er->get_array("input");
    const Value* expected = er->get_array("expected_vectors");
    std::vector<std::string> input;
    for (size_t i = 0; i < in->size(); i++) input.push_back(in->at(i).as_string());
    CHECK(input.size() == 3 && input[0] == input[2] && input[0] != input[1], "the scenario's input is not [a, b, a]");
    Tracker t;
    Client c;
    TRY(NewClient(c, t));
    std::string e1 = c.embed(input);
    std::string e2 = c.embed({input[1]});
    std::string bad = c.embed({""});
    TRY(PumpUntil(c, [&] { return t.ended(e1) && t.ended(e2) && t.ended(bad); }, 60, "the embeddings"));
    TRY(t.answered(e1, t.embeddings));
    TRY(t.answered(e2, t.embeddings));
    const EmbeddingsInfo& got = t.embeddings[e1];
    EQUAL(size_t{3}, got.vectors.size(), "vectors for 3 inputs");
    CHECK(got.prompt_tokens > 0, "prompt_tokens " + std::to_string(got.prompt_tokens));
    for (size_t i = 0; i < 3; i++) {
        EQUAL(expected->at(i).size(), got.vectors[i].size(), "the dimension of vector " + std::to_string(i));
        double norm = 0;
        for (size_t j = 0; j < got.vectors[i].size(); j++) {
            double want = expected->at(i).at(j).as_double();
            CHECK(std::fabs(want - got.vectors[i][j]) < 1e-6,
                  "vector " + std::to_string(i) + "[" + std::to_string(j) + "] is " + F(got.vectors[i][j]) +
                      ", the Python client got " + F(want));
            norm += static_cast<double>(got.vectors[i][j]) * got.vectors[i][j];
        }
        CHECK(std::fabs(std::sqrt(norm) - 1) < 1e-5, "vector " + std::to_string(i) + " has norm " + F(std::sqrt(norm)));
    }
    CHECK(got.vectors[0] == got.vectors[2], "identical texts gave different vectors");
    CHECK(got.vectors[0] != got.vectors[1], "different texts gave the same vector");
    const EmbeddingsInfo& alone = t.embeddings[e2];
    CHECK(alone.vectors.size() == 1 && alone.vectors[0] == got.vectors[1], "the second text alone gave another vector");
    CHECK(t.failures.count(bad), "an empty input did not fail");
    EQUAL(std::string("bad_request"), t.failures[bad].first, "the empty input's code");
    CHECK(Contains(t.failures[bad].second, "input"), "the message does not name input: " + t.failure(bad));
    TRY(NoBreach(t));
    return "";
}

std::string SnapshotRestore(const Value& sc) {
    const Value& r1 = sc.get_array("reference")->at(0);
    const Value& r2 = sc.get_array("reference")->at(1);
    Tracker t;
    Client c;
    ClientOptions o = Opts();
    o.reconnect_min_ms = 100;
    o.reconnect_max_ms = 1000;
    TRY(NewClient(c, t, o));
    GenerateOptions o1 = OptionsFrom(r1);
    c.generate(o1);
    TRY(PumpUntil(c, [&] { return t.ended(o1.id); }, 60, "the conversation"));
    TRY(CompareWithReference(t, r1));
    std::string s = c.snapshot(o1.id, "int8");
    TRY(PumpUntil(c, [&] { return t.ended(s); }, 60, "the snapshot"));
    TRY(t.answered(s, t.snapshots));
    SnapshotInfo snap = t.snapshots[s];
    const DoneInfo& d = t.done[o1.id];
    CHECK(!snap.blob.empty(), "the snapshot blob is empty");
    CHECK(snap.tokens > 0 && snap.tokens <= d.prompt_tokens + d.completion_tokens,
          "the snapshot holds " + std::to_string(snap.tokens) + " tokens of a " +
              std::to_string(d.prompt_tokens + d.completion_tokens) + "-token conversation");
    std::printf("@@ restart-server\n");
    std::fflush(stdout);
    std::string reply;
    std::getline(std::cin, reply);
    while (!reply.empty() && (reply.back() == '\r' || reply.back() == ' ')) reply.pop_back();
    CHECK(reply == "@@ restarted", "the harness did not restart the server: " + reply);
    TRY(PumpUntil(c, [&] { return t.connection.size() >= 3 && c.is_connected(); }, 90, "the reconnect"));
    EQUAL(std::string("True,False,True"), t.conn_str(), "on_connection_changed events");
    std::vector<uint8_t> damaged = snap.blob;
    damaged[damaged.size() / 2] ^= 0x01;
    std::string bad = c.restore(damaged);
    TRY(PumpUntil(c, [&] { return t.ended(bad); }, 60, "the damaged restore"));
    CHECK(t.failures.count(bad), "a damaged blob was restored");
    EQUAL(std::string("bad_request"), t.failures[bad].first, "the damaged blob's code");
    CHECK(!t.failures[bad].second.empty(), "the damaged blob's error has no message");
    std::string rs = c.restore(snap.blob);
    TRY(PumpUntil(c, [&] { return t.ended(rs); }, 60, "the restore"));
    TRY(t.answered(rs, t.restores));
    const RestoreInfo& restored = t.restores[rs];
    EQUAL(snap.tokens, restored.tokens, "the restored tokens");
    CHECK(restored.new_blocks > 0, "the restore added no KV blocks to the fresh server");
    GenerateOptions o2 = OptionsFrom(r2);
    c.generate(o2);
    TRY(PumpUntil(c, [&] { return t.ended(o2.id); }, 60, "the continuation"));
    TRY(CompareWithReference(t, r2));
    CHECK(t.done[o2.id].cached_tokens >= restored.tokens,
          "the continuation reports " + std::to_string(t.done[o2.id].cached_tokens) + " cached tokens; " +
              std::to_string(restored.tokens) + " were restored");
    EQUAL(0, c.in_flight(), "in_flight after every op ended");
    TRY(NoBreach(t));
    return "";
}

double Pct(std::vector<double> xs, double p) {
    std::sort(xs.begin(), xs.end());
    int i = static_cast<int>(std::ceil(p / 100.0 * static_cast<double>(xs.size()))) - 1;
    i = std::max(0, std::min(static_cast<int>(xs.size()) - 1, i));
    return xs[static_cast<size_t>(i)];
}

// A 60-fps loop: poll(2 ms) each frame, then sleep to the next frame; every frame's poll cost in ms.
std::vector<double> RunFrames(Client& c, int frames, std::vector<double>* with_events) {
    std::vector<double> costs;
    auto clock = Clock::now();
    double next = 0, frame_ms = 1000.0 / 60;
    for (int f = 0; f < frames; f++) {
        auto t0 = Clock::now();
        int n = c.poll(std::chrono::milliseconds(2));
        double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
        costs.push_back(ms);
        if (n > 0 && with_events) with_events->push_back(ms);
        next += frame_ms;
        double sleep = next - std::chrono::duration<double, std::milli>(Clock::now() - clock).count();
        if (sleep > 0) std::this_thread::sleep_for(std::chrono::microseconds(static_cast<int64_t>(sleep * 1000)));
    }
    return costs;
}

std::string PollCost() {
    Tracker t;
    Client c;
    TRY(NewClient(c, t));
    std::vector<double> idle = RunFrames(c, 120, nullptr);
    std::vector<std::string> ids;
    bool replace = true;
    int serial = 0;
    auto prompt = [&] { return "Stream " + std::to_string(serial++) + " of the market crowd"; };
    t.on_completed = [&](const std::string&, const DoneInfo&) {
        if (replace) ids.push_back(c.generate(Long(prompt(), 48)));
    };
    for (int i = 0; i < 16; i++) ids.push_back(c.generate(Long(prompt(), 48)));
    TRY(PumpUntil(c, [&] { for (auto& id : ids) if (!t.text(id).empty()) return true; return false; }, 60, "the first text"));
    std::vector<double> with_events;
    std::vector<double> busy = RunFrames(c, 150, &with_events);
    replace = false;
    std::vector<std::string> snapshot = ids;
    for (auto& id : snapshot) if (!t.ended(id)) c.cancel(id);
    TRY(PumpUntil(c, [&] { for (auto& id : ids) if (!t.ended(id)) return false; return true; }, 120, "every stream's end"));
    Settle(c, 200);
    int completed = 0;
    for (auto& id : ids) {
        CHECK(t.done.count(id), id + " failed: " + t.failure(id));
        EQUAL(t.done[id].text, t.text(id), id + ": the streamed text vs done.text");
        completed += t.done[id].finish_reason == "length";
    }
    t.on_completed = nullptr;
    TRY(NoBreach(t));
    std::string line = "METRIC poll-cost idle_median_ms=" + F(Pct(idle, 50)) + " idle_p99_ms=" + F(Pct(idle, 99)) +
                       " idle_max_ms=" + F(Pct(idle, 100)) + " streams16_median_ms=" + F(Pct(busy, 50)) +
                       " streams16_p99_ms=" + F(Pct(busy, 99)) + " streams16_max_ms=" + F(Pct(busy, 100)) +
                       " frames_idle=" + std::to_string(idle.size()) + " frames_streams16=" + std::to_string(busy.size()) +
                       " frames_with_events=" + std::to_string(with_events.size());
    if (!with_events.empty())
        line += " with_events_median_ms=" + F(Pct(with_events, 50)) + " with_events_p99_ms=" + F(Pct(with_events, 99));
    line += " streams_completed=" + std::to_string(completed) + " streams_total=" + std::to_string(ids.size());
    std::printf("%s\n", line.c_str());
    return "";
}

uint16_t FreePort() {
    int s = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = 0;
    ::bind(s, reinterpret_cast<sockaddr*>(&a), sizeof a);
    socklen_t len = sizeof a;
    ::getsockname(s, reinterpret_cast<sockaddr*>(&a), &len);
    ::close(s);
    return ntohs(a.sin_port);
}

std::string Shutdown() {
    Tracker t;
    Client c;
    TRY(NewClient(c, t));
    std::vector<std::string> ids = {c.generate(Long("Closing time, story one", 200)), c.generate(Long("Closing time, story two", 200))};
    TRY(PumpUntil(c, [&] { for (auto& id : ids) if (t.text(id).empty()) return false; return true; }, 60, "the first texts"));
    auto t0 = Clock::now();
    c.close();
    double close_ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    CHECK(close_ms < 5000, "close took " + F(close_ms) + " ms");
    TRY(PumpUntil(c, [&] { for (auto& id : ids) if (!t.ended(id)) return false; return true; }, 10, "the requests' ends after close"));
    Settle(c, 100);
    for (auto& id : ids) {
        CHECK(t.failures.count(id), id + " did not fail after close");
        EQUAL(std::string("disconnected"), t.failures[id].first, id + "'s code");
    }
    CHECK(c.state() == ConnectionState::Closed, "the state after close");
    EQUAL(0, c.in_flight(), "in_flight after close");
    TRY(NoBreach(t));
    // Nothing listening: the request fails with disconnected; close is clean.
    uint16_t free_port = FreePort();
    Tracker t2;
    Client c2;
    t2.attach(c2);
    ClientOptions o;
    o.reconnect_min_ms = 100;
    c2.connect("127.0.0.1", free_port, o);
    std::string lonely = c2.generate(Long("Is anyone there?", 4));
    TRY(PumpUntil(c2, [&] { return t2.ended(lonely); }, 30, "the request to nowhere"));
    CHECK(t2.failures.count(lonely), "the request to nowhere did not fail");
    EQUAL(std::string("disconnected"), t2.failures[lonely].first, "its code");
    CHECK(!c2.is_connected(), "connected to nothing");
    CHECK(!c2.last_error().empty(), "no last_error");
    t0 = Clock::now();
    c2.close();
    double close2 = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    CHECK(close2 < 5000, "close took " + F(close2) + " ms");
    TRY(NoBreach(t2));
    std::string reason = t2.failures[lonely].second;
    std::replace(reason.begin(), reason.end(), '"', '\'');
    std::printf("METRIC shutdown close_ms=%s close_unconnected_ms=%s refused_reason=\"%s\"\n", F(close_ms).c_str(),
                F(close2).c_str(), reason.c_str());
    return "";
}

std::string Run(const std::string& name, const Value& sc) {
    if (name == "vectors") return Vectors();
    if (name == "handshake") return Handshake();
    if (name == "fake-peers") return FakePeers();
    if (name == "concurrent-generate") return ConcurrentGenerate(sc);
    if (name == "cancel") return CancelMidStream();
    if (name == "duplicate-id") return DuplicateId();
    if (name == "busy") return Busy();
    if (name == "long-frame") return LongFrame(sc);
    if (name == "errors") return Errors();
    if (name == "warmup-frame-stats") return WarmupFrameStats();
    if (name == "pacing-deadline") return PacingDeadline();
    if (name == "npc-conversation") return Npc();
    if (name == "poll-budget") return PollBudget();
    if (name == "lease-stall") return LeaseStall();
    if (name == "session-dropped") return SessionDropped();
    if (name == "idle-window") return IdleWindow();
    if (name == "structured-output") return StructuredOutput(sc);
    if (name == "pin-unpin") return PinUnpin(sc);
    if (name == "embed") return Embed(sc);
    if (name == "snapshot-restore") return SnapshotRestore(sc);
    if (name == "server-restart") return ServerRestart(sc);
    if (name == "poll-cost") return PollCost();
    if (name == "shutdown") return Shutdown();
    return "this runner does not know the scenario '" + name + "'";
}

}  // namespace

int main(int argc, char** argv) {
    std::setvbuf(stdout, nullptr, _IOLBF, 0);
    std::string spec_path;
    std::set<std::string> only;
    for (int i = 1; i < argc; i++) {
        std::string a = argv[i];
        if (a == "--spec" && i + 1 < argc) spec_path = argv[++i];
        else if (a == "--only" && i + 1 < argc) {
            std::stringstream ss(argv[++i]);
            std::string item;
            while (std::getline(ss, item, ',')) only.insert(item);
        }
    }
    if (spec_path.empty()) {
        std::fprintf(stderr, "usage: gllm_conformance --spec SPEC.json [--only a,b]\n");
        return 2;
    }
    std::ifstream in(spec_path, std::ios::binary);
    std::stringstream buf;
    buf << in.rdbuf();
    std::string err;
    if (!json::parse(buf.str(), g_spec, &err)) {
        std::fprintf(stderr, "cannot read the spec %s: %s\n", spec_path.c_str(), err.c_str());
        return 2;
    }
    g_host = g_spec.get_string("host") ? *g_spec.get_string("host") : "127.0.0.1";
    g_port = static_cast<uint16_t>(g_spec.get_int("port").value_or(0));
    static const Value empty = Value::map();
    g_server = g_spec.get_map("server") ? g_spec.get_map("server") : &empty;
    int passed = 0, failed = 0;
    const Value* scenarios = g_spec.get_array("scenarios");
    for (size_t i = 0; scenarios && i < scenarios->size(); i++) {
        const Value& sc = scenarios->at(i);
        std::string name = *sc.get_string("name");
        if (!only.empty() && !only.count(name)) continue;
        auto t0 = Clock::now();
        std::string why = Run(name, sc);
        if (why.empty()) {
            std::printf("PASS %s\n", name.c_str());
            passed++;
        } else {
            std::replace(why.begin(), why.end(), '\n', ' ');
            std::replace(why.begin(), why.end(), '\r', ' ');
            std::printf("FAIL %s: %s\n", name.c_str(), why.c_str());
            failed++;
        }
        std::printf("METRIC %s wall_s=%s\n", name.c_str(), F(std::chrono::duration<double>(Clock::now() - t0).count()).c_str());
        std::fflush(stdout);
    }
    std::printf("%d passed, %d failed\n", passed, failed);
    std::fflush(stdout);
    return failed == 0 ? 0 : 1;
}
