// The game-facing client of the gllm bridge (bindings/PROTOCOL.md): the same design as the Unity client
// (Gllm.GllmClient) in C++ idiom. An optional background I/O thread owns the connection (ZMTP handshake, lease
// pings, PING -> PONG, reconnect with back-off) and feeds a queue; the game drains it on its own thread with
// poll(budget), once per frame, which invokes the callbacks there. Every request ends with exactly one
// on_completed or on_failed. No exceptions, no RTTI.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "gllm/protocol.h"
#include "gllm/stream.h"
#include "gllm/value.h"
#include "gllm/zmtp.h"

namespace gllm {

enum class ConnectionState { Idle, Connecting, Connected, Reconnecting, Closed };

struct ClientOptions {
    std::string client_name = "cpp/0.1";   // sent in hello (logs only)
    std::string token;                     // the server's shared secret, when it requires one (--token)
    int connect_timeout_ms = 3000;
    int handshake_timeout_ms = 5000;       // from TCP connect to welcome
    bool auto_reconnect = true;
    int reconnect_min_ms = 200;            // back-off doubles from min to max, plus up to 25 % jitter
    int reconnect_max_ms = 5000;
    int frame_report_interval_ms = 250;    // report_frame sends one report per interval (the first at once)
    double frame_smoothing = 0.2;          // weight of the newest frame in the smoothed frame time (ms)
    bool send_keepalives = true;           // lease pings; turn off only to test the server dropping a session
    bool io_thread = true;                 // false: poll() does the I/O itself (and connect blocks in poll)
    std::function<void(const std::string&)> log;   // diagnostics (called on the I/O thread)
    std::function<std::unique_ptr<ByteStream>()> stream_factory;   // default: make_socket_stream
};

// A second way to follow a client's events (several listeners may follow one client, as NpcConversation does).
class Client;

class ClientListener {
public:
    virtual ~ClientListener() = default;
    virtual void on_text(const std::string& /*id*/, const std::string& /*delta*/, const std::string& /*full*/) {}
    virtual void on_completed(const std::string& /*id*/, const DoneInfo& /*done*/) {}
    virtual void on_failed(const std::string& /*id*/, const std::string& /*code*/, const std::string& /*message*/) {}
    // The client is being destroyed: forget it (it will not call this listener again).
    virtual void on_client_destroyed(Client& /*client*/) {}
};

class Client {
public:
    static constexpr const char* kDisconnected = "disconnected";

    // ------------------------------------------------------------------ callbacks (poll's thread)
    std::function<void(const std::string& id, const std::string& delta, const std::string& full_so_far)> on_text;
    std::function<void(const std::string& id, const DoneInfo& done)> on_completed;
    // a server error code (bad_request, too_long, busy, ...) or "disconnected" when the connection was lost
    std::function<void(const std::string& id, const std::string& code, const std::string& message)> on_failed;
    std::function<void(bool connected)> on_connection_changed;
    // server errors that end no request (duplicate_id, unknown_op, unauthorized, ...); id may be empty
    std::function<void(const std::string& id, const std::string& code, const std::string& message)> on_error;
    std::function<void(const Value& stats)> on_stats;
    std::function<void(double rtt_ms)> on_pong;
    std::function<void(const std::string& id, const Value& entries)> on_logprobs;
    // the answers to the NPC-memory ops (each op ends with exactly one of these or on_failed)
    std::function<void(const std::string& id, const SnapshotInfo& snapshot)> on_snapshot;
    std::function<void(const std::string& id, const RestoreInfo& info)> on_restored;
    std::function<void(const std::string& id, const PinInfo& info)> on_pinned;
    std::function<void(const std::string& id, const UnpinInfo& info)> on_unpinned;
    std::function<void(const std::string& id, const EmbeddingsInfo& info)> on_embeddings;

    Client();
    ~Client();
    Client(const Client&) = delete;
    Client& operator=(const Client&) = delete;

    // Starts connecting (on the I/O thread, or in poll without one); returns at once. Requests made before the
    // welcome wait for it (and fail with "disconnected" if the attempt fails). Call once.
    bool connect(const std::string& host = "127.0.0.1", uint16_t port = 5555, ClientOptions options = {});
    // Starts a request; returns its id at once. It ends with exactly one on_completed or on_failed.
    std::string generate(const GenerateOptions& options);
    // Asks the server to end a request (it then completes with finish_reason "cancelled"); unknown ids: ignored.
    void cancel(const std::string& id);
    // Prefills a chat (the shared system prompt and lore) into the server's prefix cache: a 1-token greedy request.
    std::string warmup(const std::vector<ChatMessage>& messages, int priority = -1);
    // The game's frame time, once per frame (target_ms <= 0: 60 fps). Keeps a smoothed frame time and, since the
    // last report, the longest frame, the frame count and the count over 1.1 x target_ms; every
    // frame_report_interval_ms it sends one frame report with them (ms = the smoothed time) and starts the
    // counts again. Reports made while not connected are dropped (their counts too).
    void report_frame(double ms, double target_ms);
    void stats();   // the answer comes as on_stats
    void ping();    // the round trip comes as on_pong (lease pings are automatic)
    // The game will not need the device (the GPU or CPU it shares with the engine) for the next ms milliseconds:
    // call it at the end of each frame's work, if the game knows its frame's phases; the engine then steps only
    // inside such windows (PROTOCOL.md §5.1 idle). Not answered; dropped while not connected; negative/NaN: nothing.
    void report_idle(double ms);

    // NPC memory (PROTOCOL.md §5.3). Each op returns its id at once and ends exactly once, like a generate: with
    // its answer callback (on_snapshot, on_restored, on_pinned, on_unpinned, on_embeddings) or on_failed (a server
    // code such as bad_request, too_long, busy, or "disconnected"). Ops made while connecting wait for the
    // welcome. Keep their ids (empty: the client picks one) distinct from generate ids in flight.
    //
    // The KV cache of a conversation (the id of one of this client's generates that has ended), as an opaque blob
    // for the save game. encoding: "" (raw) or "int8" (about half the size). Over max_message_bytes: too_long.
    std::string snapshot(const std::string& conversation, const std::string& encoding = "", const std::string& id = "");
    std::string snapshot_tokens(const std::vector<int64_t>& tokens, const std::string& encoding = "",
                                const std::string& id = "");
    // Loads a snapshot blob back into the server's prefix cache: the next generate whose prompt starts with its
    // tokens skips their prefill. Another model's blob, or one changed in any byte: bad_request.
    std::string restore(const std::vector<uint8_t>& blob, const std::string& id = "");
    // Keeps a prefix resident on the server (never evicted) until unpin: chat messages (rendered without a
    // generation prompt: typically the shared lore), a raw prompt, or token ids.
    std::string pin(const std::vector<ChatMessage>& messages, const std::string& id = "");
    std::string pin_prompt(const std::string& prompt, const std::string& id = "");
    std::string pin_tokens(const std::vector<int64_t>& tokens, const std::string& id = "");
    std::string unpin(const std::string& pin, const std::string& id = "");
    // One unit-length vector per text (1 to 256 non-empty texts), in order; pooling "" (mean) or "last".
    std::string embed(const std::vector<std::string>& inputs, const std::string& pooling = "", const std::string& id = "");
    // Dispatches queued events on the calling thread until the budget is spent (at least one event when any is
    // waiting). Text of one request is merged into one event per poll. Returns how many events were dispatched.
    int poll(std::chrono::microseconds budget);
    // Stops the I/O thread and closes the connection; requests in flight then end with on_failed("disconnected")
    // in the next poll.
    void close();

    void add_listener(ClientListener* l);
    void remove_listener(ClientListener* l);

    ConnectionState state() const { return static_cast<ConnectionState>(state_.load()); }
    bool is_connected() const { return state() == ConnectionState::Connected; }
    std::optional<WelcomeInfo> welcome() const;
    std::string last_error() const;
    int64_t reconnects() const { return reconnects_.load(); }
    int in_flight() const { return live_.load(); }      // requests and NPC-memory ops started, not ended (I/O side)
    size_t pending_requests() const { return open_.size(); }   // started, end not dispatched yet

private:
    enum class EvKind { Text, Completed, Failed, Connection, Error, Stats, Pong, Reply };   // Reply: map, op in text
    struct Ev {
        EvKind kind = EvKind::Text;
        std::string id, text, code, message;
        DoneInfo done;
        bool flag = false;
        Value map, logprobs;
        double value = 0.0;
    };
    enum class CmdKind { Request, Cancel, Send };   // Request: a generate or an NPC-memory op (one end each)
    struct Cmd {
        CmdKind kind = CmdKind::Send;
        std::string id;
        std::vector<uint8_t> payload;
        bool generate = false;   // a generate (ends with done/error), not another request (ends with its reply)
    };
    struct Conn {
        std::shared_ptr<ByteStream> stream;
        zmtp::Reader reader;
        bool got_ready = false;
        std::vector<uint8_t> parts;
        bool in_parts = false;
    };
    using Clock = std::chrono::steady_clock;

    // game thread
    // an NPC-memory op: built with its id, sent like a generate (invalid: why the arguments are refused, or null)
    std::string start_op(const std::string& id, const std::function<std::vector<uint8_t>(const std::string&)>& build,
                         const char* invalid);
    void enqueue(Cmd c);
    void push_local(Ev e);
    void stage(Ev e);
    void dispatch(Ev& e);
    // I/O side
    void io_main();
    void io_step(int max_wait_ms);
    void io_finish();
    void open();
    void service(const std::shared_ptr<Conn>& c, int max_wait_ms);
    void read_frames(const std::shared_ptr<Conn>& c);
    void on_command(const std::shared_ptr<Conn>& c, const zmtp::Frame& f);
    void on_message(const std::shared_ptr<Conn>& c, const Value& m);
    void process_commands(const std::shared_ptr<Conn>& c);
    void drain_commands_while_down();
    bool cancel_waiting(const std::string& id);
    void send_generate(const std::shared_ptr<Conn>& c, Cmd& cmd);
    void send_message(const std::shared_ptr<Conn>& c, const std::vector<uint8_t>& payload);
    void send_raw(const std::shared_ptr<Conn>& c, const std::vector<uint8_t>& bytes);
    void lost(const std::string& why, bool retry_now);
    void fail_all(const std::string& why);
    void emit(Ev e);
    void emit_end(Ev e);
    void log(const std::string& s);
    int next_wait_ms() const;
    int keepalive_ms() const;
    std::deque<Cmd> take_commands();

    ClientOptions opt_;
    std::string host_;
    uint16_t port_ = 0;
    bool started_ = false;
    std::thread thread_;
    std::atomic<bool> stop_{false};
    std::atomic<int> state_{static_cast<int>(ConnectionState::Idle)};
    std::atomic<int64_t> reconnects_{0};
    std::atomic<int> live_{0};

    mutable std::mutex mu_;            // events_, commands_, welcome_, last_error_, wake_target_
    std::condition_variable cv_;
    std::vector<Ev> events_;
    std::deque<Cmd> commands_;
    std::optional<WelcomeInfo> welcome_;
    std::string last_error_;
    std::shared_ptr<ByteStream> wake_target_;

    // I/O side
    std::shared_ptr<Conn> conn_;
    std::unordered_set<std::string> inflight_;
    std::unordered_set<std::string> generating_;   // the generates among inflight_: another op's reply never ends them
    std::vector<Cmd> waiting_;
    std::vector<uint8_t> send_buf_;
    std::vector<uint8_t> rx_;
    Clock::time_point last_send_, deadline_, next_attempt_;
    int backoff_ms_ = 0;
    bool first_attempt_ = true;
    uint64_t jitter_ = 0x9e3779b97f4a7c15ull;
    int lease_ms_ = 5000;
    int64_t max_message_bytes_ = INT64_MAX;   // from the welcome

    // game thread
    std::unordered_map<std::string, std::string> open_;
    std::vector<Ev> carry_;
    size_t carry_pos_ = 0;
    std::unordered_map<std::string, size_t> pending_text_;
    std::vector<ClientListener*> listeners_;
    uint64_t next_id_ = 0;
    double frame_ema_ = -1.0;
    double frame_max_ = 0.0;       // since the last report
    int64_t frame_count_ = 0;
    int64_t frame_over_ = 0;
    Clock::time_point last_frame_sent_{};
    bool frame_sent_ = false;
};

// One NPC's side of the dialogue: its persona (system prompt) and the chat so far. Say() sends the chat with
// the player's line, the reply is appended when it completes, the oldest turns are trimmed so that the prompt
// and the reply fit max_seq_len, and to_json/from_json save and load it with the game.
class NpcConversation : public ClientListener {
public:
    std::string name;
    std::string system_prompt;             // sent first with every request, never trimmed
    std::vector<ChatMessage> history;      // user and assistant turns, oldest first
    GenerateOptions settings;              // sampling for every reply (max_tokens 96, temperature 0.7 by default)
    int max_seq_len = 0;                   // 0: the server's, from the welcome
    double bytes_per_token = 2.5;          // conservative estimate for trimming (no tokenizer on the client)
    int tokens_per_message = 8;
    std::function<void(const std::string& full)> on_reply_updated;
    std::function<void(const DoneInfo& done)> on_reply_completed;
    std::function<void(const std::string& code, const std::string& message)> on_reply_failed;

    NpcConversation();
    NpcConversation(std::string name, std::string system_prompt);
    ~NpcConversation() override;
    NpcConversation(const NpcConversation&) = delete;
    NpcConversation& operator=(const NpcConversation&) = delete;

    // The player says a line: appended, trimmed, sent; returns the request id. A reply still running is cancelled.
    std::string say(Client& client, const std::string& line, std::optional<int64_t> priority = std::nullopt);
    void cancel();
    std::vector<ChatMessage> build_messages() const;
    int estimate_tokens() const;
    int trim(int max_seq_len, int max_new_tokens);   // returns how many messages were dropped
    const std::string& active_request_id() const { return active_; }
    const std::string& partial_reply() const { return partial_; }
    void attach(Client& client);
    void detach();

    std::string to_json() const;
    static bool from_json(const std::string& text, NpcConversation& out, std::string* error = nullptr);

    void on_text(const std::string& id, const std::string& delta, const std::string& full) override;
    void on_completed(const std::string& id, const DoneInfo& done) override;
    void on_failed(const std::string& id, const std::string& code, const std::string& message) override;
    void on_client_destroyed(Client& client) override;

private:
    int estimate(const std::string& text) const;
    Client* client_ = nullptr;
    std::string active_;
    std::string partial_;
};

}  // namespace gllm
