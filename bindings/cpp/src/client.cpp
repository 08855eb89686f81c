// gllm::Client (see client.h): the I/O side (session, lease, reconnect) and the game side (queue, poll).
#include "gllm/client.h"

#include <algorithm>
#include <cmath>

namespace gllm {

namespace {
double ms_since(std::chrono::steady_clock::time_point t) {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count();
}
int64_t now_us() {
    return std::chrono::duration_cast<std::chrono::microseconds>(
        std::chrono::steady_clock::now().time_since_epoch()).count();
}
}  // namespace

Client::Client() = default;

Client::~Client() {
    close();
    std::vector<ClientListener*> ls;
    ls.swap(listeners_);
    for (ClientListener* l : ls) if (l) l->on_client_destroyed(*this);
}

// ---------------------------------------------------------------------------------------------- API
bool Client::connect(const std::string& host, uint16_t port, ClientOptions options) {
    if (started_ || host.empty()) return false;
    started_ = true;
    host_ = host;
    port_ = port;
    opt_ = std::move(options);
    if (!opt_.stream_factory) opt_.stream_factory = [] { return make_socket_stream(); };
    state_ = static_cast<int>(ConnectionState::Connecting);
    next_attempt_ = Clock::now();
    backoff_ms_ = std::max(1, opt_.reconnect_min_ms);
    jitter_ ^= static_cast<uint64_t>(now_us());
    if (opt_.io_thread) thread_ = std::thread([this] { io_main(); });
    return true;
}

std::string Client::generate(const GenerateOptions& o) {
    std::string id = o.id;
    if (id.empty()) id = "g" + std::to_string(++next_id_);
    if (!open_.count(id)) open_[id] = std::string();
    live_++;
    if (o.prompt.has_value() == o.messages.has_value()) {
        Ev e;
        e.kind = EvKind::Failed;
        e.id = id;
        e.code = "bad_request";
        e.message = "give exactly one of prompt and messages";
        push_local(std::move(e));
        return id;
    }
    if (!started_ || stop_) {
        Ev e;
        e.kind = EvKind::Failed;
        e.id = id;
        e.code = kDisconnected;
        e.message = started_ ? "the client was closed" : "call connect first";
        push_local(std::move(e));
        return id;
    }
    Cmd c;
    c.kind = CmdKind::Request;
    c.id = id;
    c.generate = true;
    c.payload = messages::generate(id, o);
    enqueue(std::move(c));
    return id;
}

void Client::cancel(const std::string& id) {
    if (id.empty() || !started_) return;
    Cmd c;
    c.kind = CmdKind::Cancel;
    c.id = id;
    c.payload = messages::cancel(id);
    enqueue(std::move(c));
}

std::string Client::warmup(const std::vector<ChatMessage>& msgs, int priority) {
    GenerateOptions o;
    o.messages = msgs;
    o.max_tokens = 1;
    o.temperature = 0.0;
    o.priority = priority;
    return generate(o);
}

void Client::report_frame(double ms, double target_ms) {
    if (!started_ || std::isnan(ms) || ms < 0) return;
    constexpr double kMaxMs = 1e9;          // the protocol's limit on ms, target_ms and max_ms
    constexpr int64_t kMaxFrames = 1000000;  // and on frames
    ms = std::min(ms, kMaxMs);
    bool has_target = target_ms > 0;        // false for NaN too
    if (has_target) target_ms = std::min(target_ms, kMaxMs);
    frame_ema_ = frame_ema_ < 0 ? ms : frame_ema_ + opt_.frame_smoothing * (ms - frame_ema_);
    frame_max_ = std::max(frame_max_, ms);
    if (frame_count_ < kMaxFrames) {
        frame_count_++;
        if (ms > 1.1 * (has_target ? target_ms : 1000.0 / 60.0)) frame_over_++;
    }
    auto now = Clock::now();
    if (frame_sent_ && now - last_frame_sent_ < std::chrono::milliseconds(opt_.frame_report_interval_ms)) return;
    frame_sent_ = true;
    last_frame_sent_ = now;
    Cmd c;
    c.payload = messages::frame(frame_ema_, has_target ? std::optional<double>(target_ms) : std::nullopt, frame_max_,
                                frame_count_, frame_over_);
    enqueue(std::move(c));
    frame_max_ = 0.0;
    frame_count_ = 0;
    frame_over_ = 0;
}

void Client::stats() {
    if (!started_) return;
    Cmd c;
    c.payload = messages::stats_request();
    enqueue(std::move(c));
}

void Client::ping() {
    if (!started_) return;
    Cmd c;
    c.payload = messages::ping(Value::integer(now_us()));
    enqueue(std::move(c));
}

void Client::report_idle(double ms) {
    if (!started_ || std::isnan(ms) || ms < 0) return;
    Cmd c;
    c.payload = messages::idle(std::min(ms, 1e9));
    enqueue(std::move(c));
}

std::string Client::start_op(const std::string& given,
                             const std::function<std::vector<uint8_t>(const std::string&)>& build,
                             const char* invalid) {
    std::string id = given.empty() ? "m" + std::to_string(++next_id_) : given;
    live_++;
    if (invalid || !started_ || stop_) {
        Ev e;
        e.kind = EvKind::Failed;
        e.id = id;
        e.code = invalid ? "bad_request" : kDisconnected;
        e.message = invalid ? invalid : started_ ? "the client was closed" : "call connect first";
        push_local(std::move(e));
        return id;
    }
    Cmd c;
    c.kind = CmdKind::Request;
    c.id = id;
    c.payload = build(id);
    enqueue(std::move(c));
    return id;
}

std::string Client::snapshot(const std::string& conversation, const std::string& encoding, const std::string& id) {
    return start_op(id, [&](const std::string& rid) { return messages::snapshot(rid, conversation, {}, encoding); },
                    conversation.empty() ? "snapshot needs a conversation id" : nullptr);
}

std::string Client::snapshot_tokens(const std::vector<int64_t>& tokens, const std::string& encoding,
                                    const std::string& id) {
    return start_op(id, [&](const std::string& rid) { return messages::snapshot(rid, "", tokens, encoding); },
                    tokens.empty() ? "snapshot needs 1 or more token ids" : nullptr);
}

std::string Client::restore(const std::vector<uint8_t>& blob, const std::string& id) {
    return start_op(id, [&](const std::string& rid) { return messages::restore(rid, blob); },
                    blob.empty() ? "the blob is empty" : nullptr);
}

std::string Client::pin(const std::vector<ChatMessage>& msgs, const std::string& id) {
    return start_op(id, [&](const std::string& rid) { return messages::pin(rid, nullptr, &msgs, nullptr); },
                    msgs.empty() ? "pin needs 1 or more messages" : nullptr);
}

std::string Client::pin_prompt(const std::string& prompt, const std::string& id) {
    return start_op(id, [&](const std::string& rid) { return messages::pin(rid, &prompt, nullptr, nullptr); },
                    prompt.empty() ? "pin needs a non-empty prompt" : nullptr);
}

std::string Client::pin_tokens(const std::vector<int64_t>& tokens, const std::string& id) {
    return start_op(id, [&](const std::string& rid) { return messages::pin(rid, nullptr, nullptr, &tokens); },
                    tokens.empty() ? "pin needs 1 or more token ids" : nullptr);
}

std::string Client::unpin(const std::string& pin_name, const std::string& id) {
    return start_op(id, [&](const std::string& rid) { return messages::unpin(rid, pin_name); },
                    pin_name.empty() ? "unpin needs the pin's name" : nullptr);
}

std::string Client::embed(const std::vector<std::string>& inputs, const std::string& pooling, const std::string& id) {
    return start_op(id, [&](const std::string& rid) { return messages::embed(rid, inputs, pooling); },
                    inputs.empty() ? "embed needs 1 or more texts" : nullptr);
}

int Client::poll(std::chrono::microseconds budget) {
    auto start = Clock::now();
    if (started_ && !opt_.io_thread && !stop_) {
        for (int i = 0; i < 64; i++) {   // read what is there, without waiting
            size_t before;
            {
                std::lock_guard<std::mutex> lock(mu_);
                before = events_.size();
            }
            io_step(0);
            std::lock_guard<std::mutex> lock(mu_);
            if (events_.size() == before && commands_.empty()) break;
        }
    }
    std::vector<Ev> incoming;
    {
        std::lock_guard<std::mutex> lock(mu_);
        incoming.swap(events_);
    }
    for (Ev& e : incoming) stage(std::move(e));
    int n = 0;
    while (carry_pos_ < carry_.size()) {
        if (n > 0 && Clock::now() - start >= budget) break;
        Ev e = std::move(carry_[carry_pos_]);
        size_t index = carry_pos_++;
        if (e.kind == EvKind::Text) {
            auto it = pending_text_.find(e.id);
            if (it != pending_text_.end() && it->second == index) pending_text_.erase(it);
        }
        if (carry_pos_ == carry_.size()) {
            carry_.clear();
            carry_pos_ = 0;
        }
        n++;
        dispatch(e);
    }
    return n;
}

void Client::close() {
    if (!started_) {
        state_ = static_cast<int>(ConnectionState::Closed);
        return;
    }
    if (stop_.exchange(true)) return;
    {
        std::lock_guard<std::mutex> lock(mu_);
        if (wake_target_) wake_target_->wake();
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
    else io_finish();
    state_ = static_cast<int>(ConnectionState::Closed);
}

void Client::add_listener(ClientListener* l) {
    if (l && std::find(listeners_.begin(), listeners_.end(), l) == listeners_.end()) listeners_.push_back(l);
}

void Client::remove_listener(ClientListener* l) {
    auto it = std::find(listeners_.begin(), listeners_.end(), l);
    if (it != listeners_.end()) *it = nullptr;   // compacted outside dispatch
}

std::optional<WelcomeInfo> Client::welcome() const {
    std::lock_guard<std::mutex> lock(mu_);
    return welcome_;
}

std::string Client::last_error() const {
    std::lock_guard<std::mutex> lock(mu_);
    return last_error_;
}

// ---------------------------------------------------------------------------------------------- game side
void Client::enqueue(Cmd c) {
    std::lock_guard<std::mutex> lock(mu_);
    commands_.push_back(std::move(c));
    // wake a read wait; a connect in progress is left alone (commands wait for the welcome anyway)
    if (wake_target_ && state_.load() == static_cast<int>(ConnectionState::Connected)) wake_target_->wake();
    cv_.notify_all();
}

void Client::push_local(Ev e) {
    live_--;
    std::lock_guard<std::mutex> lock(mu_);
    events_.push_back(std::move(e));
}

void Client::stage(Ev e) {
    if (e.kind == EvKind::Text) {
        auto it = pending_text_.find(e.id);
        if (it != pending_text_.end()) {
            Ev& p = carry_[it->second];
            p.text += e.text;
            if (e.logprobs.is_array()) {
                if (!p.logprobs.is_array()) p.logprobs = std::move(e.logprobs);
                else for (size_t i = 0; i < e.logprobs.size(); i++) p.logprobs.push(e.logprobs.at(i));
            }
            return;
        }
        pending_text_[e.id] = carry_.size();
    } else if (!e.id.empty() && (e.kind == EvKind::Completed || e.kind == EvKind::Failed)) {
        pending_text_.erase(e.id);   // text after this end (an id reused at once) starts a new event
    }
    carry_.push_back(std::move(e));
}

void Client::dispatch(Ev& e) {
    std::vector<ClientListener*> ls;
    switch (e.kind) {
        case EvKind::Text: {
            auto it = open_.find(e.id);
            if (it == open_.end()) return;
            if (e.logprobs.is_array() && on_logprobs) on_logprobs(e.id, e.logprobs);
            if (e.text.empty()) return;
            it->second += e.text;
            std::string full = it->second;
            if (on_text) on_text(e.id, e.text, full);
            ls = listeners_;
            for (ClientListener* l : ls) if (l) l->on_text(e.id, e.text, full);
            break;
        }
        case EvKind::Completed:
            open_.erase(e.id);
            if (on_completed) on_completed(e.id, e.done);
            ls = listeners_;
            for (ClientListener* l : ls) if (l) l->on_completed(e.id, e.done);
            break;
        case EvKind::Failed:
            open_.erase(e.id);
            if (on_failed) on_failed(e.id, e.code, e.message);
            ls = listeners_;
            for (ClientListener* l : ls) if (l) l->on_failed(e.id, e.code, e.message);
            break;
        case EvKind::Connection:
            if (on_connection_changed) on_connection_changed(e.flag);
            break;
        case EvKind::Error:
            if (on_error) on_error(e.id, e.code, e.message);
            break;
        case EvKind::Stats:
            if (on_stats) on_stats(e.map);
            break;
        case EvKind::Pong:
            if (on_pong) on_pong(e.value);
            break;
        case EvKind::Reply:
            if (e.text == "snapshot") { if (on_snapshot) on_snapshot(e.id, SnapshotInfo::from_message(e.map)); }
            else if (e.text == "restored") { if (on_restored) on_restored(e.id, RestoreInfo::from_message(e.map)); }
            else if (e.text == "pinned") { if (on_pinned) on_pinned(e.id, PinInfo::from_message(e.map)); }
            else if (e.text == "unpinned") { if (on_unpinned) on_unpinned(e.id, UnpinInfo::from_message(e.map)); }
            else if (on_embeddings) on_embeddings(e.id, EmbeddingsInfo::from_message(e.map));
            break;
    }
    listeners_.erase(std::remove(listeners_.begin(), listeners_.end(), nullptr), listeners_.end());
}

// ---------------------------------------------------------------------------------------------- I/O side
void Client::emit(Ev e) {
    std::lock_guard<std::mutex> lock(mu_);
    events_.push_back(std::move(e));
}

void Client::emit_end(Ev e) {
    {
        std::lock_guard<std::mutex> lock(mu_);
        events_.push_back(std::move(e));
    }
    live_--;
}

void Client::log(const std::string& s) {
    if (opt_.log) opt_.log(s);
}

std::deque<Client::Cmd> Client::take_commands() {
    std::deque<Cmd> out;
    std::lock_guard<std::mutex> lock(mu_);
    out.swap(commands_);
    return out;
}

void Client::io_main() {
    while (!stop_) io_step(250);
    io_finish();
}

void Client::io_step(int max_wait_ms) {
    if (!conn_) {
        auto now = Clock::now();
        bool may_try = first_attempt_ || opt_.auto_reconnect;
        if (now < next_attempt_ || !may_try) {
            drain_commands_while_down();   // requests made while no attempt is under way fail now
            if (max_wait_ms > 0) {
                int wait = max_wait_ms;
                if (may_try) {
                    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(next_attempt_ - now).count() + 1;
                    wait = static_cast<int>(std::min<int64_t>(wait, left));
                }
                std::unique_lock<std::mutex> lock(mu_);
                cv_.wait_for(lock, std::chrono::milliseconds(wait), [this] { return stop_.load() || !commands_.empty(); });
            }
            return;
        }
        if (!first_attempt_) reconnects_++;
        first_attempt_ = false;
        open();
        return;
    }
    std::shared_ptr<Conn> c = conn_;
    service(c, max_wait_ms);
}

void Client::io_finish() {
    std::shared_ptr<Conn> c = conn_;
    conn_.reset();
    if (c) c->stream->close();
    {
        std::lock_guard<std::mutex> lock(mu_);
        wake_target_.reset();
    }
    fail_all("the client was closed");
    drain_commands_while_down();
    if (state_.load() == static_cast<int>(ConnectionState::Connected)) {
        Ev e;
        e.kind = EvKind::Connection;
        e.flag = false;
        emit(std::move(e));
    }
    state_ = static_cast<int>(ConnectionState::Closed);
}

void Client::open() {
    state_ = static_cast<int>(ConnectionState::Connecting);
    auto c = std::make_shared<Conn>();
    c->stream = std::shared_ptr<ByteStream>(opt_.stream_factory().release());
    if (!c->stream) {
        lost("no byte stream", false);
        return;
    }
    conn_ = c;
    {
        std::lock_guard<std::mutex> lock(mu_);
        wake_target_ = c->stream;
    }
    if (stop_) return;
    std::string err;
    if (!c->stream->connect(host_, port_, opt_.connect_timeout_ms, &err)) {
        if (stop_) return;
        lost("cannot connect to " + host_ + ":" + std::to_string(port_) + ": " + err, false);
        return;
    }
    deadline_ = Clock::now() + std::chrono::milliseconds(opt_.handshake_timeout_ms);
    send_raw(c, zmtp::client_opening());
}

void Client::service(const std::shared_ptr<Conn>& c, int max_wait_ms) {
    process_commands(c);
    if (conn_ != c) return;
    auto now = Clock::now();
    int st = state_.load();
    if (st == static_cast<int>(ConnectionState::Connecting) && now > deadline_) {
        lost("no welcome within " + std::to_string(opt_.handshake_timeout_ms) + " ms", false);
        return;
    }
    if (st == static_cast<int>(ConnectionState::Connected) && opt_.send_keepalives &&
        now - last_send_ >= std::chrono::milliseconds(keepalive_ms())) {
        send_message(c, messages::ping(Value::nil()));
        if (conn_ != c) return;
    }
    int wait = std::min(max_wait_ms, next_wait_ms());
    if (rx_.size() < 65536) rx_.resize(65536);
    for (int round = 0; round < 64; round++) {
        std::string err;
        long n = c->stream->read_some(rx_.data(), rx_.size(), round == 0 ? wait : 0, &err);
        if (n < 0) {
            lost(err.empty() ? "the server closed the connection" : err, false);
            return;
        }
        if (n == 0) return;
        c->reader.feed(rx_.data(), static_cast<size_t>(n));
        read_frames(c);
        if (conn_ != c) return;
    }
}

void Client::read_frames(const std::shared_ptr<Conn>& c) {
    zmtp::Frame f;
    while (conn_ == c) {
        zmtp::Reader::Result r = c->reader.next(f);
        if (r == zmtp::Reader::Result::None) return;
        if (r == zmtp::Reader::Result::Error) {
            lost("protocol error: " + c->reader.error(), false);
            return;
        }
        if (f.command()) {
            on_command(c, f);
            continue;
        }
        if (!c->got_ready) {
            lost("protocol error: a message arrived before the server's READY", false);
            return;
        }
        if (f.more()) {
            c->parts.insert(c->parts.end(), f.body, f.body + f.size);
            c->in_parts = true;
            continue;
        }
        const uint8_t* body = f.body;
        size_t size = f.size;
        std::vector<uint8_t> joined;
        if (c->in_parts) {
            c->parts.insert(c->parts.end(), f.body, f.body + f.size);
            joined.swap(c->parts);
            c->in_parts = false;
            body = joined.data();
            size = joined.size();
        }
        Value msg;
        std::string err;
        if (!msgpack::decode(body, size, msg, &err)) {
            log("gllm: ignoring an undecodable message: " + err);
            continue;
        }
        if (msg.is_map()) on_message(c, msg);
    }
}

void Client::on_command(const std::shared_ptr<Conn>& c, const zmtp::Frame& f) {
    std::string name;
    size_t data = 0;
    if (!zmtp::command_name(f.body, f.size, name, data)) {
        lost("protocol error: malformed command frame", false);
        return;
    }
    if (name == "READY") {
        if (c->got_ready) return;
        std::vector<std::pair<std::string, std::string>> props;
        if (!zmtp::parse_properties(f.body + data, f.size - data, props)) {
            lost("protocol error: malformed READY", false);
            return;
        }
        for (auto& p : props)
            if (zmtp::iequals(p.first, "Socket-Type") && p.second != "ROUTER") {
                lost("protocol error: the server's socket is a " + p.second + ", not a ROUTER", false);
                return;
            }
        c->got_ready = true;
        send_message(c, messages::hello(opt_.client_name, opt_.token.empty() ? nullptr : &opt_.token));
    } else if (name == "ERROR") {
        std::string reason;
        if (f.size > data) {
            size_t n = std::min<size_t>(f.body[data], f.size - data - 1);
            reason.assign(reinterpret_cast<const char*>(f.body + data + 1), n);
        }
        lost("the server refused the connection: " + reason, false);
    } else if (name == "PING") {
        if (!c->got_ready) return;
        size_t ctx = std::min(f.size, data + 2);   // 2-byte TTL, then up to 16 bytes of context
        size_t len = std::min<size_t>(16, f.size - ctx);
        send_raw(c, zmtp::pong(f.body + ctx, len));
    }
    // PONG and unknown commands: ignored
}

void Client::on_message(const std::shared_ptr<Conn>& c, const Value& m) {
    const std::string* op = m.get_string("op");
    if (!op) return;
    if (*op == "welcome") {
        WelcomeInfo w = WelcomeInfo::from_message(m);
        if (w.version != kProtocolVersion) {
            lost("the server speaks protocol v" + std::to_string(w.version) + "; this client speaks v1", false);
            return;
        }
        lease_ms_ = w.lease_ms;
        max_message_bytes_ = w.max_message_bytes;
        {
            std::lock_guard<std::mutex> lock(mu_);
            welcome_ = w;
        }
        if (state_.load() == static_cast<int>(ConnectionState::Connected)) return;   // a repeated welcome
        state_ = static_cast<int>(ConnectionState::Connected);
        backoff_ms_ = std::max(1, opt_.reconnect_min_ms);
        {
            std::lock_guard<std::mutex> lock(mu_);
            last_error_.clear();
        }
        Ev e;
        e.kind = EvKind::Connection;
        e.flag = true;
        emit(std::move(e));
        std::vector<Cmd> waiting;
        waiting.swap(waiting_);
        for (Cmd& cmd : waiting) {
            if (conn_ != c) { waiting_.push_back(std::move(cmd)); continue; }
            send_generate(c, cmd);
        }
    } else if (*op == "tokens") {
        const Value* items = m.get_array("items");
        if (!items) return;
        for (size_t i = 0; i < items->size(); i++) {
            const Value& it = items->at(i);
            if (!it.is_map()) continue;
            const std::string* id = it.get_string("id");
            if (!id || !inflight_.count(*id)) continue;
            const std::string* text = it.get_string("text");
            const Value* lps = it.get_array("logprobs");
            if ((!text || text->empty()) && !lps) continue;
            Ev e;
            e.kind = EvKind::Text;
            e.id = *id;
            if (text) e.text = *text;
            if (lps) e.logprobs = *lps;
            emit(std::move(e));
        }
    } else if (*op == "done") {
        const std::string* id = m.get_string("id");
        if (id && inflight_.erase(*id)) {
            generating_.erase(*id);
            Ev e;
            e.kind = EvKind::Completed;
            e.id = *id;
            e.done = DoneInfo::from_message(m);
            emit_end(std::move(e));
        }
    } else if (*op == "error") {
        const std::string* idp = m.get_string("id");
        const std::string* codep = m.get_string("code");
        const std::string* msgp = m.get_string("message");
        std::string id = idp ? *idp : std::string();
        std::string code = codep ? *codep : std::string("bad_request");
        std::string message = msgp ? *msgp : std::string();
        if (code == "no_session") {   // the server dropped this session (lease, backlog): everything is gone
            lost("the server ended the session: " + message, true);
            return;
        }
        if (idp && code != "duplicate_id" && inflight_.erase(id)) {
            generating_.erase(id);
            Ev e;
            e.kind = EvKind::Failed;
            e.id = id;
            e.code = code;
            e.message = message;
            emit_end(std::move(e));
            return;
        }
        Ev e;
        e.kind = EvKind::Error;
        e.id = id;
        e.code = code;
        e.message = message;
        emit(std::move(e));
        if (state_.load() == static_cast<int>(ConnectionState::Connecting) && !idp)
            lost("the server refused the session: " + code + ": " + message, false);   // hello refused
    } else if (*op == "pong") {
        const Value* t = m.find("t");
        if (t && t->is_int()) {
            Ev e;
            e.kind = EvKind::Pong;
            e.value = static_cast<double>(now_us() - t->as_int()) / 1000.0;
            emit(std::move(e));
        }
    } else if (*op == "stats") {
        Ev e;
        e.kind = EvKind::Stats;
        e.map = m;
        emit(std::move(e));
    } else if (*op == "snapshot" || *op == "restored" || *op == "pinned" || *op == "unpinned" || *op == "embeddings") {
        const std::string* id = m.get_string("id");
        if (!id || generating_.count(*id) || !inflight_.erase(*id)) return;   // a generate ends with done/error
        Ev e;
        e.id = *id;
        const Value* blob = m.find("blob");
        if (*op == "snapshot" && (!blob || blob->type() != Value::Type::Bin)) {
            e.kind = EvKind::Failed;
            e.code = "bad_request";
            e.message = "the snapshot reply carries no bin blob";
        } else {
            e.kind = EvKind::Reply;
            e.text = *op;
            e.map = m;
        }
        emit_end(std::move(e));
    }
    // unknown ops: ignored (§4.3)
}

void Client::process_commands(const std::shared_ptr<Conn>& c) {
    std::deque<Cmd> cmds = take_commands();
    while (!cmds.empty()) {
        if (conn_ != c) {   // the connection went away meanwhile: the rest is handled on the next round
            std::lock_guard<std::mutex> lock(mu_);
            while (!cmds.empty()) { commands_.push_front(std::move(cmds.back())); cmds.pop_back(); }
            return;
        }
        Cmd cmd = std::move(cmds.front());
        cmds.pop_front();
        bool ready = state_.load() == static_cast<int>(ConnectionState::Connected);
        switch (cmd.kind) {
            case CmdKind::Request:
                if (ready) send_generate(c, cmd);
                else waiting_.push_back(std::move(cmd));
                break;
            case CmdKind::Cancel:
                if (cancel_waiting(cmd.id)) break;
                if (ready && inflight_.count(cmd.id)) send_message(c, cmd.payload);
                break;
            case CmdKind::Send:
                if (ready) send_message(c, cmd.payload);
                break;
        }
    }
}

void Client::drain_commands_while_down() {
    std::deque<Cmd> cmds = take_commands();
    for (Cmd& cmd : cmds) {
        if (cmd.kind == CmdKind::Cancel) { cancel_waiting(cmd.id); continue; }
        if (cmd.kind != CmdKind::Request) continue;
        std::string le = last_error();
        Ev e;
        e.kind = EvKind::Failed;
        e.id = cmd.id;
        e.code = kDisconnected;
        e.message = stop_ ? std::string("the client was closed")
                          : "not connected to the gllm server at " + host_ + ":" + std::to_string(port_) +
                                (le.empty() ? std::string() : " (" + le + ")");
        emit_end(std::move(e));
    }
}

bool Client::cancel_waiting(const std::string& id) {
    for (size_t i = 0; i < waiting_.size(); i++)
        if (waiting_[i].id == id) {
            waiting_.erase(waiting_.begin() + static_cast<std::ptrdiff_t>(i));
            Ev e;
            e.kind = EvKind::Completed;
            e.id = id;
            e.done.id = id;
            e.done.finish_reason = "cancelled";
            emit_end(std::move(e));
            return true;
        }
    return false;
}

void Client::send_generate(const std::shared_ptr<Conn>& c, Cmd& cmd) {
    if (static_cast<int64_t>(cmd.payload.size()) > max_message_bytes_) {
        if (!inflight_.count(cmd.id)) {
            Ev e;
            e.kind = EvKind::Failed;
            e.id = cmd.id;
            e.code = "too_long";
            e.message = "the request is " + std::to_string(cmd.payload.size()) +
                        " bytes; the server accepts at most " + std::to_string(max_message_bytes_);
            emit_end(std::move(e));
        } else {
            live_--;
        }
        return;
    }
    if (!inflight_.insert(cmd.id).second) live_--;   // a duplicate: the server answers duplicate_id, no end of its own
    else if (cmd.generate) generating_.insert(cmd.id);
    send_message(c, cmd.payload);
}

void Client::send_message(const std::shared_ptr<Conn>& c, const std::vector<uint8_t>& payload) {
    send_buf_.clear();
    zmtp::write_header(send_buf_, 0, payload.size());
    send_buf_.insert(send_buf_.end(), payload.begin(), payload.end());
    send_raw(c, send_buf_);
    last_send_ = Clock::now();
}

void Client::send_raw(const std::shared_ptr<Conn>& c, const std::vector<uint8_t>& bytes) {
    if (conn_ != c) return;
    std::string err;
    if (!c->stream->write_all(bytes.data(), bytes.size(), &err)) lost(err, false);
}

void Client::lost(const std::string& why, bool retry_now) {
    std::shared_ptr<Conn> c = conn_;
    conn_.reset();
    if (c) c->stream->close();
    bool was_connected = state_.load() == static_cast<int>(ConnectionState::Connected);
    {
        std::lock_guard<std::mutex> lock(mu_);
        last_error_ = why;
        wake_target_.reset();
    }
    log("gllm: " + why);
    fail_all(why);
    if (was_connected) {
        Ev e;
        e.kind = EvKind::Connection;
        e.flag = false;
        emit(std::move(e));
    }
    state_ = static_cast<int>(ConnectionState::Reconnecting);
    int delay = 0;
    if (!retry_now) {
        jitter_ ^= jitter_ << 13; jitter_ ^= jitter_ >> 7; jitter_ ^= jitter_ << 17;
        delay = backoff_ms_ + static_cast<int>(jitter_ % static_cast<uint64_t>(backoff_ms_ / 4 + 1));
        backoff_ms_ = std::min(opt_.reconnect_max_ms, std::max(1, backoff_ms_ * 2));
    }
    next_attempt_ = Clock::now() + std::chrono::milliseconds(delay);
    if (!opt_.auto_reconnect && !stop_) state_ = static_cast<int>(ConnectionState::Idle);
}

void Client::fail_all(const std::string& why) {
    for (const std::string& id : inflight_) {
        Ev e;
        e.kind = EvKind::Failed;
        e.id = id;
        e.code = kDisconnected;
        e.message = why;
        emit_end(std::move(e));
    }
    inflight_.clear();
    generating_.clear();
    for (Cmd& cmd : waiting_) {
        Ev e;
        e.kind = EvKind::Failed;
        e.id = cmd.id;
        e.code = kDisconnected;
        e.message = why;
        emit_end(std::move(e));
    }
    waiting_.clear();
}

int Client::keepalive_ms() const { return std::max(10, lease_ms_ / 3); }

int Client::next_wait_ms() const {
    auto now = Clock::now();
    double wait = 250;
    int st = state_.load();
    if (st == static_cast<int>(ConnectionState::Connecting))
        wait = std::min(wait, std::chrono::duration<double, std::milli>(deadline_ - now).count() + 1);
    else if (st == static_cast<int>(ConnectionState::Connected) && opt_.send_keepalives)
        wait = std::min(wait, keepalive_ms() - ms_since(last_send_) + 1);
    return static_cast<int>(std::max(0.0, wait));
}

}  // namespace gllm
