// Two NPCs of Eldmoor answer the player at once, streaming their replies in the terminal through the same
// gllm::Client an Unreal game uses (bindings/cpp). Start a server first (`gllm serve`), then:
//     npc_chat [--host 127.0.0.1] [--port 5555] [--max-tokens 48] [--line "Seen the dragon?"] [--no-io-thread 1]
//              [--tokens-per-s 25] [--deadline-ms 500]
// (--no-io-thread: the client does its I/O inside poll() instead of on its own thread; --tokens-per-s paces each
// reply to about as fast as it is read, leaving the compute to the other NPC; --deadline-ms asks for the first
// token within that many ms and says whether it came in time.)
// On a terminal each NPC gets one growing line; otherwise each finished reply is printed on its own line.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>

#include "gllm/client.h"

int main(int argc, char** argv) {
    std::string host = "127.0.0.1", line = "Seen the dragon?";
    int port = 5555, max_tokens = 48;
    double tokens_per_s = 0.0, deadline_ms = 0.0;
    bool io_thread = true;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!std::strcmp(argv[i], "--host")) host = argv[i + 1];
        else if (!std::strcmp(argv[i], "--port")) port = std::atoi(argv[i + 1]);
        else if (!std::strcmp(argv[i], "--max-tokens")) max_tokens = std::atoi(argv[i + 1]);
        else if (!std::strcmp(argv[i], "--line")) line = argv[i + 1];
        else if (!std::strcmp(argv[i], "--no-io-thread")) io_thread = std::atoi(argv[i + 1]) == 0;
        else if (!std::strcmp(argv[i], "--tokens-per-s")) tokens_per_s = std::atof(argv[i + 1]);
        else if (!std::strcmp(argv[i], "--deadline-ms")) deadline_ms = std::atof(argv[i + 1]);
    }
    const bool tty = isatty(1) != 0;

    gllm::Client client;
    gllm::ClientOptions options;
    options.client_name = "npc_chat/0.1";
    options.io_thread = io_thread;
    std::string connection_error;
    client.on_failed = [&](const std::string&, const std::string& code, const std::string& message) {
        if (code == gllm::Client::kDisconnected) connection_error = message;
    };
    client.connect(host, static_cast<uint16_t>(port), options);

    gllm::NpcConversation guard("Brann", "You are Brann, a tired town guard of Eldmoor. Answer in one short sentence.");
    gllm::NpcConversation bard("Lira", "You are Lira, a cheerful bard of Eldmoor who sings of old bridges. Answer in one short sentence.");
    std::vector<gllm::NpcConversation*> npcs = {&guard, &bard};
    std::vector<std::string> shown(npcs.size());
    std::vector<std::string> notes;
    int finished = 0, failed = 0;
    auto redraw = [&] {
        if (!tty) return;
        std::printf("\x1b[%zuA", npcs.size());
        for (size_t i = 0; i < npcs.size(); i++) std::printf("\r\x1b[2K%s: %s\n", npcs[i]->name.c_str(), shown[i].c_str());
        std::fflush(stdout);
    };
    for (size_t i = 0; i < npcs.size(); i++) {
        gllm::NpcConversation* npc = npcs[i];
        npc->settings.max_tokens = max_tokens;
        if (tokens_per_s > 0) npc->settings.max_tokens_per_s = tokens_per_s;
        if (deadline_ms > 0) npc->settings.ttft_deadline_ms = deadline_ms;
        npc->on_reply_updated = [&, i](const std::string& full) { shown[i] = full; redraw(); };
        npc->on_reply_completed = [&, i, npc](const gllm::DoneInfo& done) {
            shown[i] = done.text;
            finished++;
            if (tty) redraw();
            else std::printf("%s: %s\n", npc->name.c_str(), done.text.c_str());
            if (done.ttft_deadline_met) {   // only when a deadline was asked; printed after the loop
                char note[160];
                std::snprintf(note, sizeof note, "(%s's first token after %.0f ms: deadline %s)", npc->name.c_str(),
                              done.ttft_ms ? *done.ttft_ms : -1.0, *done.ttft_deadline_met ? "met" : "missed");
                notes.push_back(note);
            }
        };
        npc->on_reply_failed = [&, npc](const std::string& code, const std::string& message) {
            failed++;
            std::printf("%s could not answer: %s: %s\n", npc->name.c_str(), code.c_str(), message.c_str());
        };
    }
    std::printf("Player: %s\n", line.c_str());
    if (tty) for (size_t i = 0; i < npcs.size(); i++) std::printf("%s: \n", npcs[i]->name.c_str());
    for (gllm::NpcConversation* npc : npcs) npc->say(client, line);

    // The game loop: 60 frames a second, the client drained with a 1 ms budget per frame.
    auto start = std::chrono::steady_clock::now();
    auto last = start;
    while (finished + failed < static_cast<int>(npcs.size())) {
        auto now = std::chrono::steady_clock::now();
        // every frame: the client sends four reports a second (smoothed time, longest frame, frames over target)
        client.report_frame(std::chrono::duration<double, std::milli>(now - last).count(), 1000.0 / 60);
        last = now;
        client.poll(std::chrono::milliseconds(1));
        if (now - start > std::chrono::seconds(120)) {
            std::printf("gave up after 120 s\n");
            return 1;
        }
        std::this_thread::sleep_for(std::chrono::microseconds(16667));
    }
    client.close();
    for (const std::string& note : notes) std::printf("%s\n", note.c_str());
    if (failed) {
        if (!connection_error.empty()) std::printf("is `gllm serve` running on %s:%d? (%s)\n", host.c_str(), port, connection_error.c_str());
        return 1;
    }
    std::printf("(%d NPCs answered; history kept for the next line: %zu and %zu messages)\n", finished,
                guard.history.size(), bard.history.size());
    return 0;
}
