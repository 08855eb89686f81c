// ZMTP 3.1 for a DEALER with the NULL mechanism (bindings/PROTOCOL.md §2): the greeting, READY, short and long
// frames, PING -> PONG, ERROR. Pure byte handling; the socket lives behind gllm::ByteStream.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace gllm {
namespace zmtp {

constexpr size_t kGreetingSize = 64;
constexpr uint8_t kFlagMore = 0x01, kFlagLong = 0x02, kFlagCommand = 0x04;

std::vector<uint8_t> greeting();                         // vector zmtp-greeting
std::vector<uint8_t> ready(std::string_view socket_type);   // vector zmtp-ready-dealer / zmtp-ready-router
std::vector<uint8_t> client_opening();                   // greeting + READY(DEALER): vector zmtp-client-opening
std::vector<uint8_t> pong(const uint8_t* context, size_t size);   // vector zmtp-pong for an empty context
// A frame header: the short form for 0-255 bytes, the long form (8-byte size) above (§2.2).
void write_header(std::vector<uint8_t>& dst, uint8_t flags, uint64_t size);
std::vector<uint8_t> message_frame(const uint8_t* body, size_t size);
inline std::vector<uint8_t> message_frame(const std::vector<uint8_t>& body) { return message_frame(body.data(), body.size()); }

// Checks a peer's 64-byte greeting (§2.1): false (and why) when the connection must be closed.
bool check_greeting(const uint8_t* g, std::string* error);
// Splits a command frame's body into its name and the offset of its data.
bool command_name(const uint8_t* body, size_t size, std::string& name, size_t& data_offset);
// The properties of a READY command's data, in order (names as sent; compare them case-insensitively).
bool parse_properties(const uint8_t* data, size_t size, std::vector<std::pair<std::string, std::string>>& out);
bool iequals(std::string_view a, std::string_view b);

struct Frame {
    uint8_t flags = 0;
    const uint8_t* body = nullptr;   // valid until the next feed()
    size_t size = 0;
    bool command() const { return (flags & kFlagCommand) != 0; }
    bool more() const { return (flags & kFlagMore) != 0; }
};

// Incremental reader of a ZMTP stream: the 64-byte greeting, then frames; keeps partial input between feeds.
class Reader {
public:
    enum class Result { None, Frame, Error };
    explicit Reader(uint64_t max_frame_bytes = 64ull << 20) : max_frame_(max_frame_bytes) {}
    void feed(const uint8_t* data, size_t size);
    Result next(Frame& out);   // None: need more bytes; Error: close the connection (error() says why)
    bool greeting_done() const { return greeted_; }
    const std::string& error() const { return error_; }
private:
    std::vector<uint8_t> buf_;
    size_t start_ = 0;
    bool greeted_ = false;
    uint64_t max_frame_;
    std::string error_;
};

}  // namespace zmtp
}  // namespace gllm
