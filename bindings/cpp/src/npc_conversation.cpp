// gllm::NpcConversation (see client.h): one NPC's persona and chat, trimmed to fit, saved as JSON.
#include <cmath>

#include "gllm/client.h"

namespace gllm {

NpcConversation::NpcConversation() {
    settings.max_tokens = 96;
    settings.temperature = 0.7;
}

NpcConversation::NpcConversation(std::string n, std::string sys) : NpcConversation() {
    name = std::move(n);
    system_prompt = std::move(sys);
}

NpcConversation::~NpcConversation() { detach(); }

void NpcConversation::attach(Client& client) {
    if (client_ == &client) return;
    detach();
    client_ = &client;
    client.add_listener(this);
}

void NpcConversation::detach() {
    if (client_) client_->remove_listener(this);
    client_ = nullptr;
}

std::string NpcConversation::say(Client& client, const std::string& line, std::optional<int64_t> priority) {
    attach(client);
    if (!active_.empty()) cancel();
    history.push_back(ChatMessage::user(line));
    GenerateOptions o = settings;
    o.id.clear();
    o.prompt.reset();
    if (priority) o.priority = priority;
    int max_seq = max_seq_len;
    if (max_seq <= 0) {
        std::optional<WelcomeInfo> w = client.welcome();
        if (w) max_seq = static_cast<int>(w->max_seq_len);
    }
    trim(max_seq, static_cast<int>(o.max_tokens.value_or(256)));
    o.messages = build_messages();
    partial_.clear();
    active_ = client.generate(o);
    return active_;
}

void NpcConversation::cancel() {
    if (active_.empty()) return;
    if (client_) client_->cancel(active_);
    active_.clear();
    partial_.clear();
}

std::vector<ChatMessage> NpcConversation::build_messages() const {
    std::vector<ChatMessage> list;
    list.reserve(history.size() + 1);
    if (!system_prompt.empty()) list.push_back(ChatMessage::system(system_prompt));
    list.insert(list.end(), history.begin(), history.end());
    return list;
}

int NpcConversation::estimate(const std::string& text) const {
    double bpt = bytes_per_token < 0.5 ? 0.5 : bytes_per_token;
    return tokens_per_message + static_cast<int>(std::ceil(static_cast<double>(text.size()) / bpt));
}

int NpcConversation::estimate_tokens() const {
    int total = system_prompt.empty() ? 0 : estimate(system_prompt);
    for (const ChatMessage& m : history) total += estimate(m.content);
    return total;
}

int NpcConversation::trim(int max_seq, int max_new_tokens) {
    if (max_seq <= 0) return 0;
    int dropped = 0;
    while (history.size() > 1 && estimate_tokens() + max_new_tokens > max_seq) {
        history.erase(history.begin());
        dropped++;
        // keep the chat starting with a user turn, as chat templates expect
        while (history.size() > 1 && history[0].role == "assistant") { history.erase(history.begin()); dropped++; }
    }
    return dropped;
}

void NpcConversation::on_text(const std::string& id, const std::string&, const std::string& full) {
    if (active_.empty() || id != active_) return;
    partial_ = full;
    if (on_reply_updated) on_reply_updated(full);
}

void NpcConversation::on_completed(const std::string& id, const DoneInfo& done) {
    if (active_.empty() || id != active_) return;
    active_.clear();
    partial_.clear();
    if (done.finish_reason == "stop" || done.finish_reason == "length") history.push_back(ChatMessage::assistant(done.text));
    if (on_reply_completed) on_reply_completed(done);
}

void NpcConversation::on_failed(const std::string& id, const std::string& code, const std::string& message) {
    if (active_.empty() || id != active_) return;
    active_.clear();
    partial_.clear();
    if (on_reply_failed) on_reply_failed(code, message);
}

void NpcConversation::on_client_destroyed(Client& client) {
    if (client_ == &client) client_ = nullptr;
    active_.clear();
    partial_.clear();
}

std::string NpcConversation::to_json() const {
    Value h = Value::array();
    for (const ChatMessage& m : history) {
        Value e = Value::map();
        e.set("role", Value::string(m.role));
        e.set("content", Value::string(m.content));
        h.push(std::move(e));
    }
    Value map = Value::map();
    map.set("name", Value::string(name));
    map.set("system", Value::string(system_prompt));
    map.set("history", std::move(h));
    map.set("max_seq_len", Value::integer(max_seq_len));
    return json::serialize(map);
}

bool NpcConversation::from_json(const std::string& text, NpcConversation& out, std::string* error) {
    Value map;
    if (!json::parse(text, map, error)) return false;
    if (!map.is_map()) {
        if (error) *error = "a conversation is a JSON object";
        return false;
    }
    const std::string* n = map.get_string("name");
    const std::string* s = map.get_string("system");
    out.name = n ? *n : std::string();
    out.system_prompt = s ? *s : std::string();
    out.max_seq_len = static_cast<int>(map.get_int("max_seq_len").value_or(0));
    out.history.clear();
    if (const Value* h = map.get_array("history"))
        for (size_t i = 0; i < h->size(); i++) {
            const Value& e = h->at(i);
            if (!e.is_map()) continue;
            const std::string* role = e.get_string("role");
            const std::string* content = e.get_string("content");
            out.history.push_back({role ? *role : "user", content ? *content : ""});
        }
    return true;
}

}  // namespace gllm
