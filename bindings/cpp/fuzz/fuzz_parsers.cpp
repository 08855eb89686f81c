// libFuzzer target for everything the client parses from the network (and the spec/save-game JSON):
//   clang++ -fsanitize=fuzzer,address,undefined ... ; ./gllm_fuzz_parsers -runs=200000 CORPUS_DIR
// The first byte picks the parser, the rest is its input:
//   0  msgpack::decode; a decoded value must re-encode and decode to the same value
//   1  zmtp::Reader fed in chunks (sizes taken from the input), each frame's body decoded / parsed as a command
//   2  a whole gllm::Client session (no I/O thread) reading the input as the server's byte stream
//   3  json::parse; a parsed value must serialize and parse back
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "gllm/client.h"

namespace {

void check(bool ok) {
    if (!ok) std::abort();
}

void fuzz_msgpack(const uint8_t* d, size_t n) {
    gllm::Value v;
    if (!gllm::msgpack::decode(d, n, v)) return;
    std::vector<uint8_t> again = gllm::msgpack::encode(v);
    gllm::Value w;
    check(gllm::msgpack::decode(again.data(), again.size(), w));
    check(v.equals(w, true));
    if (v.is_map()) {
        gllm::DoneInfo::from_message(v);
        gllm::WelcomeInfo::from_message(v);
    }
}

void fuzz_zmtp(const uint8_t* d, size_t n) {
    gllm::zmtp::Reader r(1 << 20);
    size_t pos = 0;
    while (pos < n) {
        size_t chunk = 1 + (d[pos] % 64);
        if (chunk > n - pos) chunk = n - pos;
        r.feed(d + pos, chunk);
        pos += chunk;
        gllm::zmtp::Frame f;
        gllm::zmtp::Reader::Result res;
        while ((res = r.next(f)) == gllm::zmtp::Reader::Result::Frame) {
            if (f.command()) {
                std::string name;
                size_t off = 0;
                if (gllm::zmtp::command_name(f.body, f.size, name, off)) {
                    std::vector<std::pair<std::string, std::string>> props;
                    gllm::zmtp::parse_properties(f.body + off, f.size - off, props);
                }
            } else {
                fuzz_msgpack(f.body, f.size);
            }
        }
        if (res == gllm::zmtp::Reader::Result::Error) return;
    }
}

// The server side of a connection: hands out the fuzz input in chunks, swallows what the client writes.
class FuzzStream final : public gllm::ByteStream {
public:
    FuzzStream(const uint8_t* d, size_t n) : d_(d), n_(n) {}
    bool connect(const std::string&, uint16_t, int, std::string*) override { return true; }
    bool write_all(const uint8_t*, size_t, std::string*) override { return !closed_; }
    long read_some(uint8_t* buf, size_t cap, int, std::string* error) override {
        if (closed_ || pos_ >= n_) {
            if (error) *error = "end of input";
            return -1;
        }
        size_t chunk = 1 + (d_[pos_] % 200);
        if (chunk > n_ - pos_) chunk = n_ - pos_;
        if (chunk > cap) chunk = cap;
        std::memcpy(buf, d_ + pos_, chunk);
        pos_ += chunk;
        return static_cast<long>(chunk);
    }
    void wake() override {}
    void close() override { closed_ = true; }
private:
    const uint8_t* d_;
    size_t n_;
    size_t pos_ = 0;
    bool closed_ = false;
};

void fuzz_client(const uint8_t* d, size_t n) {
    gllm::Client c;
    int events = 0;
    c.on_text = [&](const std::string&, const std::string&, const std::string&) { events++; };
    c.on_completed = [&](const std::string&, const gllm::DoneInfo&) { events++; };
    c.on_failed = [&](const std::string&, const std::string&, const std::string&) { events++; };
    gllm::ClientOptions o;
    o.io_thread = false;
    o.auto_reconnect = false;
    o.stream_factory = [d, n] { return std::unique_ptr<gllm::ByteStream>(new FuzzStream(d, n)); };
    c.connect("fuzz", 1, o);
    gllm::GenerateOptions g;
    g.id = "npc7";
    g.prompt = "hi";
    c.generate(g);
    g.id = "guard-1";
    c.generate(g);
    for (int i = 0; i < 8; i++) {
        c.report_frame(i % 2 ? 30.0 : 16.0, 16.6);   // frame reports go out with whatever the session is doing
        c.poll(std::chrono::microseconds(0));
    }
    c.close();
    while (c.poll(std::chrono::microseconds(0)) > 0) {
    }
    check(c.in_flight() == 0);
    check(c.pending_requests() == 0);   // every request ended exactly once, whatever the server sent
}

void fuzz_json(const uint8_t* d, size_t n) {
    gllm::Value v;
    if (!gllm::json::parse(std::string(reinterpret_cast<const char*>(d), n), v)) return;
    gllm::Value w;
    check(gllm::json::parse(gllm::json::serialize(v), w));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    if (size < 1) return 0;
    switch (data[0] % 4) {
        case 0: fuzz_msgpack(data + 1, size - 1); break;
        case 1: fuzz_zmtp(data + 1, size - 1); break;
        case 2: fuzz_client(data + 1, size - 1); break;
        case 3: fuzz_json(data + 1, size - 1); break;
    }
    return 0;
}
