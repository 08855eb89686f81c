// ZMTP 3.1 framing (see zmtp.h).
#include "gllm/zmtp.h"

#include <cstring>

namespace gllm {
namespace zmtp {
namespace {

void add_short_string(std::vector<uint8_t>& b, std::string_view s) {
    b.push_back(static_cast<uint8_t>(s.size()));
    b.insert(b.end(), s.begin(), s.end());
}

void add_property(std::vector<uint8_t>& b, std::string_view name, std::string_view value) {
    add_short_string(b, name);
    uint32_t n = static_cast<uint32_t>(value.size());
    for (int i = 3; i >= 0; i--) b.push_back(static_cast<uint8_t>(n >> (8 * i)));
    b.insert(b.end(), value.begin(), value.end());
}

std::vector<uint8_t> command_frame(const std::vector<uint8_t>& body) {
    std::vector<uint8_t> f;
    f.reserve(body.size() + 9);
    write_header(f, kFlagCommand, body.size());
    f.insert(f.end(), body.begin(), body.end());
    return f;
}

}  // namespace

std::vector<uint8_t> greeting() {
    std::vector<uint8_t> g(kGreetingSize, 0);
    g[0] = 0xff;
    g[8] = 0x01;
    g[9] = 0x7f;
    g[10] = 3;
    g[11] = 1;
    std::memcpy(&g[12], "NULL", 4);
    return g;
}

std::vector<uint8_t> ready(std::string_view socket_type) {
    std::vector<uint8_t> body;
    add_short_string(body, "READY");
    add_property(body, "Socket-Type", socket_type);
    add_property(body, "Identity", "");
    return command_frame(body);
}

std::vector<uint8_t> client_opening() {
    std::vector<uint8_t> b = greeting();
    std::vector<uint8_t> r = ready("DEALER");
    b.insert(b.end(), r.begin(), r.end());
    return b;
}

std::vector<uint8_t> pong(const uint8_t* context, size_t size) {
    std::vector<uint8_t> body;
    add_short_string(body, "PONG");
    if (size > 0) body.insert(body.end(), context, context + size);
    return command_frame(body);
}

void write_header(std::vector<uint8_t>& dst, uint8_t flags, uint64_t size) {
    if (size <= 255) {
        dst.push_back(static_cast<uint8_t>(flags & ~kFlagLong));
        dst.push_back(static_cast<uint8_t>(size));
    } else {
        dst.push_back(static_cast<uint8_t>(flags | kFlagLong));
        for (int i = 7; i >= 0; i--) dst.push_back(static_cast<uint8_t>(size >> (8 * i)));
    }
}

std::vector<uint8_t> message_frame(const uint8_t* body, size_t size) {
    std::vector<uint8_t> f;
    f.reserve(size + 9);
    write_header(f, 0, size);
    if (size > 0) f.insert(f.end(), body, body + size);
    return f;
}

bool check_greeting(const uint8_t* g, std::string* error) {
    auto fail = [&](std::string why) {
        if (error) *error = std::move(why);
        return false;
    };
    if (g[0] != 0xff) return fail("not a ZMTP peer (greeting byte 0 is not ff)");
    if ((g[9] & 1) == 0) return fail("not a ZMTP peer (greeting byte 9, bit 0 clear)");
    if (g[10] < 3) return fail("the peer speaks ZMTP " + std::to_string(g[10]) + ", not 3");
    std::string mech;
    for (size_t i = 12; i < 32 && g[i] != 0; i++) mech += static_cast<char>(g[i]);
    if (mech != "NULL")
        return fail("the server uses the " + mech + " security mechanism; this client speaks only NULL");
    return true;
}

bool command_name(const uint8_t* body, size_t size, std::string& name, size_t& data_offset) {
    if (size < 1 || body[0] > size - 1) return false;
    name.assign(reinterpret_cast<const char*>(body + 1), body[0]);
    data_offset = 1 + static_cast<size_t>(body[0]);
    return true;
}

bool parse_properties(const uint8_t* d, size_t size, std::vector<std::pair<std::string, std::string>>& out) {
    size_t pos = 0;
    while (pos < size) {
        size_t n = d[pos++];
        if (size - pos < n + 4) return false;
        std::string name(reinterpret_cast<const char*>(d + pos), n);
        pos += n;
        uint64_t len = (uint64_t(d[pos]) << 24) | (uint64_t(d[pos + 1]) << 16) | (uint64_t(d[pos + 2]) << 8) | d[pos + 3];
        pos += 4;
        if (size - pos < len) return false;
        out.emplace_back(std::move(name), std::string(reinterpret_cast<const char*>(d + pos), static_cast<size_t>(len)));
        pos += static_cast<size_t>(len);
    }
    return true;
}

bool iequals(std::string_view a, std::string_view b) {
    if (a.size() != b.size()) return false;
    for (size_t i = 0; i < a.size(); i++) {
        char x = a[i], y = b[i];
        if (x >= 'A' && x <= 'Z') x = static_cast<char>(x - 'A' + 'a');
        if (y >= 'A' && y <= 'Z') y = static_cast<char>(y - 'A' + 'a');
        if (x != y) return false;
    }
    return true;
}

void Reader::feed(const uint8_t* data, size_t size) {
    if (start_ > 0 && (start_ == buf_.size() || start_ >= 65536)) {   // drop what was consumed
        buf_.erase(buf_.begin(), buf_.begin() + static_cast<std::ptrdiff_t>(start_));
        start_ = 0;
    }
    buf_.insert(buf_.end(), data, data + size);
}

Reader::Result Reader::next(Frame& out) {
    if (!error_.empty()) return Result::Error;
    size_t avail = buf_.size() - start_;
    if (!greeted_) {
        if (avail < kGreetingSize) return Result::None;
        if (!check_greeting(&buf_[start_], &error_)) return Result::Error;
        start_ += kGreetingSize;
        greeted_ = true;
        avail -= kGreetingSize;
    }
    if (avail < 2) return Result::None;
    uint8_t f = buf_[start_];
    if ((f & 0xf8) != 0) {
        error_ = "bad frame flags " + std::to_string(f);
        return Result::Error;
    }
    uint64_t size;
    size_t header;
    if (f & kFlagLong) {
        if (avail < 9) return Result::None;
        size = 0;
        for (size_t i = 1; i <= 8; i++) size = (size << 8) | buf_[start_ + i];
        if (size > max_frame_) {
            error_ = "a frame of " + std::to_string(size) + " bytes is over the limit";
            return Result::Error;
        }
        header = 9;
    } else {
        size = buf_[start_ + 1];
        header = 2;
    }
    if (avail - header < size) return Result::None;
    out.flags = f;
    out.body = buf_.data() + start_ + header;
    out.size = static_cast<size_t>(size);
    start_ += header + static_cast<size_t>(size);
    return Result::Frame;
}

}  // namespace zmtp
}  // namespace gllm
