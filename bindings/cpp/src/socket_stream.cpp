// ByteStream over BSD sockets and Winsock, behind one small shim. On POSIX a pipe wakes a waiting poll(); on
// Windows the wait is sliced (2 ms) and checks a flag, which keeps the shim free of extra sockets.
#include "gllm/stream.h"

#include <atomic>
#include <chrono>
#include <cstring>
#include <mutex>

#ifdef _WIN32
#ifndef WIN32_LEAN_AND_MEAN
#define WIN32_LEAN_AND_MEAN
#endif
#ifndef NOMINMAX
#define NOMINMAX
#endif
#include <winsock2.h>
#include <ws2tcpip.h>
#ifdef _MSC_VER
#pragma comment(lib, "ws2_32.lib")
#endif
using socket_t = SOCKET;
static const socket_t kBadSocket = INVALID_SOCKET;
static int last_error() { return WSAGetLastError(); }
static void close_socket(socket_t s) { closesocket(s); }
static int poll_fds(WSAPOLLFD* fds, unsigned n, int ms) { return WSAPoll(fds, n, ms); }
using pollfd_t = WSAPOLLFD;
#define GLLM_WOULD_BLOCK(e) ((e) == WSAEWOULDBLOCK || (e) == WSAEINPROGRESS)
#else
#include <arpa/inet.h>
#include <cerrno>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>
using socket_t = int;
static const socket_t kBadSocket = -1;
static int last_error() { return errno; }
static void close_socket(socket_t s) { ::close(s); }
static int poll_fds(struct pollfd* fds, unsigned n, int ms) { return ::poll(fds, n, ms); }
using pollfd_t = struct pollfd;
#define GLLM_WOULD_BLOCK(e) ((e) == EWOULDBLOCK || (e) == EAGAIN || (e) == EINPROGRESS)
#endif

namespace gllm {
namespace {

std::string describe(const char* what, int code) {
#ifdef _WIN32
    return std::string(what) + " (WSA error " + std::to_string(code) + ")";
#else
    return std::string(what) + " (" + std::strerror(code) + ")";
#endif
}

void set_nonblocking(socket_t s) {
#ifdef _WIN32
    u_long on = 1;
    ioctlsocket(s, FIONBIO, &on);
#else
    int fl = fcntl(s, F_GETFL, 0);
    fcntl(s, F_SETFL, fl | O_NONBLOCK);
#endif
}

class SocketStream final : public ByteStream {
public:
    SocketStream() {
#ifdef _WIN32
        WSADATA wsa;
        wsa_ok_ = WSAStartup(MAKEWORD(2, 2), &wsa) == 0;
#else
        int fds[2];
        if (::pipe(fds) == 0) {
            wake_r_ = fds[0];
            wake_w_ = fds[1];
            set_nonblocking(wake_r_);
            set_nonblocking(wake_w_);
        }
#endif
    }

    ~SocketStream() override {
        close();
#ifdef _WIN32
        if (wsa_ok_) WSACleanup();
#else
        if (wake_r_ >= 0) ::close(wake_r_);
        if (wake_w_ >= 0) ::close(wake_w_);
#endif
    }

    bool connect(const std::string& host, uint16_t port, int timeout_ms, std::string* error) override {
        close();
        addrinfo hints;
        std::memset(&hints, 0, sizeof hints);
        hints.ai_family = AF_UNSPEC;
        hints.ai_socktype = SOCK_STREAM;
        hints.ai_protocol = IPPROTO_TCP;
        addrinfo* res = nullptr;
        std::string service = std::to_string(port);
        int rc = getaddrinfo(host.c_str(), service.c_str(), &hints, &res);
        if (rc != 0 || !res) {
            if (error) *error = "cannot resolve " + host;
            return false;
        }
        auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
        std::string why = "no address";
        bool ok = false;
        for (addrinfo* ai = res; ai && !ok; ai = ai->ai_next) {
            socket_t s = ::socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
            if (s == kBadSocket) { why = describe("socket() failed", last_error()); continue; }
            set_nonblocking(s);
            int one = 1;
            setsockopt(s, IPPROTO_TCP, TCP_NODELAY, reinterpret_cast<const char*>(&one), sizeof one);
#ifdef SO_NOSIGPIPE
            setsockopt(s, SOL_SOCKET, SO_NOSIGPIPE, &one, sizeof one);
#endif
            int c = ::connect(s, ai->ai_addr, static_cast<int>(ai->ai_addrlen));
            if (c != 0 && !GLLM_WOULD_BLOCK(last_error())) {
                why = describe("connect failed", last_error());
                close_socket(s);
                continue;
            }
            while (c != 0) {   // in progress: wait for writable, a wake, or the deadline
                int left = static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(
                    deadline - std::chrono::steady_clock::now()).count());
                if (left <= 0) { why = "connect timed out after " + std::to_string(timeout_ms) + " ms"; break; }
                int r = wait(s, POLLOUT, left);
                if (r < 0) { why = "interrupted"; break; }
                if (r == 0) continue;
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(s, SOL_SOCKET, SO_ERROR, reinterpret_cast<char*>(&err), &len);
                if (err != 0) { why = describe("connect failed", err); break; }
                c = 0;
            }
            if (c == 0) {
                std::lock_guard<std::mutex> lock(mu_);
                sock_ = s;
                ok = true;
            } else {
                close_socket(s);
            }
        }
        freeaddrinfo(res);
        if (!ok && error) *error = why;
        return ok;
    }

    bool write_all(const uint8_t* data, size_t size, std::string* error) override {
        size_t sent = 0;
        auto stalled_since = std::chrono::steady_clock::now();
        while (sent < size) {
#ifdef _WIN32
            int n = ::send(sock_, reinterpret_cast<const char*>(data + sent), static_cast<int>(size - sent), 0);
#elif defined(MSG_NOSIGNAL)
            long n = ::send(sock_, data + sent, size - sent, MSG_NOSIGNAL);
#else
            long n = ::send(sock_, data + sent, size - sent, 0);
#endif
            if (n > 0) {
                sent += static_cast<size_t>(n);
                stalled_since = std::chrono::steady_clock::now();
                continue;
            }
            int e = last_error();
            if (n < 0 && GLLM_WOULD_BLOCK(e)) {
                if (std::chrono::steady_clock::now() - stalled_since > std::chrono::seconds(10)) {
                    if (error) *error = "send timed out (the server has not read for 10 s)";
                    return false;
                }
                pollfd_t p;
                p.fd = sock_;
                p.events = POLLOUT;
                p.revents = 0;
                poll_fds(&p, 1, 100);
                continue;
            }
            if (error) *error = describe("send failed", e);
            return false;
        }
        return true;
    }

    long read_some(uint8_t* buf, size_t capacity, int timeout_ms, std::string* error) override {
        if (sock_ == kBadSocket) {
            if (error) *error = "not connected";
            return -1;
        }
        if (timeout_ms > 0) {
            int r = wait(sock_, POLLIN, timeout_ms);
            if (r <= 0) return 0;   // timed out or woken
        }
#ifdef _WIN32
        int n = ::recv(sock_, reinterpret_cast<char*>(buf), static_cast<int>(capacity), 0);
#else
        long n = ::recv(sock_, buf, capacity, 0);
#endif
        if (n > 0) return static_cast<long>(n);
        if (n == 0) {
            if (error) *error = "the server closed the connection";
            return -1;
        }
        int e = last_error();
        if (GLLM_WOULD_BLOCK(e)) return 0;
        if (error) *error = describe("recv failed", e);
        return -1;
    }

    void wake() override {
        woken_.store(true);
#ifndef _WIN32
        if (wake_w_ >= 0) {
            char b = 1;
            ssize_t n = ::write(wake_w_, &b, 1);
            (void)n;
        }
#endif
    }

    void close() override {
        std::lock_guard<std::mutex> lock(mu_);
        if (sock_ != kBadSocket) {
            close_socket(sock_);
            sock_ = kBadSocket;
        }
    }

private:
    // Waits for `events` on s, a wake, or the timeout: 1 ready, 0 timeout, -1 woken.
    int wait(socket_t s, short events, int timeout_ms) {
        auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
        while (true) {
            if (woken_.exchange(false)) { drain_wake(); return -1; }
            int left = static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(
                deadline - std::chrono::steady_clock::now()).count());
            if (left < 0) left = 0;
#ifdef _WIN32
            pollfd_t p[1];
            p[0].fd = s; p[0].events = events; p[0].revents = 0;
            int slice = left < 2 ? left : 2;
            int r = poll_fds(p, 1, slice);
            if (r > 0) return 1;
            if (r < 0) return 1;   // let the read report the error
            if (left == 0) return 0;
#else
            pollfd_t p[2];
            p[0].fd = s; p[0].events = events; p[0].revents = 0;
            p[1].fd = wake_r_; p[1].events = POLLIN; p[1].revents = 0;
            int r = poll_fds(p, wake_r_ >= 0 ? 2 : 1, left);
            if (r < 0 && last_error() == EINTR) continue;
            if (r < 0) return 1;
            if (r > 0 && (p[0].revents & (events | POLLERR | POLLHUP))) {
                if (woken_.exchange(false)) drain_wake();
                return 1;
            }
            if (r > 0) continue;   // the wake pipe: handled at the top
            if (left == 0) return 0;
#endif
        }
    }

    void drain_wake() {
#ifndef _WIN32
        char b[64];
        while (wake_r_ >= 0 && ::read(wake_r_, b, sizeof b) > 0) {
        }
#endif
    }

    std::mutex mu_;
    socket_t sock_ = kBadSocket;
    std::atomic<bool> woken_{false};
#ifdef _WIN32
    bool wsa_ok_ = false;
#else
    int wake_r_ = -1, wake_w_ = -1;
#endif
};

}  // namespace

std::unique_ptr<ByteStream> make_socket_stream() { return std::unique_ptr<ByteStream>(new SocketStream()); }

}  // namespace gllm
