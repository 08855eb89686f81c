// The byte stream the client's session runs over: a TCP connection in practice. The core ships one over BSD
// sockets / Winsock (make_socket_stream); an engine can supply its own (the Unreal plugin wraps FSocket).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace gllm {

class ByteStream {
public:
    virtual ~ByteStream() = default;
    // Connects (Nagle off). Blocks up to timeout_ms; wake() ends the wait early (and the attempt fails).
    virtual bool connect(const std::string& host, uint16_t port, int timeout_ms, std::string* error) = 0;
    // Writes every byte (blocking while the peer's window is full); false when the connection is gone.
    virtual bool write_all(const uint8_t* data, size_t size, std::string* error) = 0;
    // Waits up to timeout_ms for input (or a wake()), then reads what is there: > 0 bytes read, 0 nothing yet,
    // -1 the connection is closed or failed (error says why).
    virtual long read_some(uint8_t* buf, size_t capacity, int timeout_ms, std::string* error) = 0;
    // Thread-safe: ends a connect or read_some wait in progress (or the next one) early.
    virtual void wake() = 0;
    virtual void close() = 0;
};

// TCP over BSD sockets (Linux, macOS, consoles with a BSD layer) or Winsock (Windows).
std::unique_ptr<ByteStream> make_socket_stream();

}  // namespace gllm
