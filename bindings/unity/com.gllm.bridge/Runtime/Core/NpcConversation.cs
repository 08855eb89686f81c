// One NPC's side of the dialogue: its persona (system prompt) and the chat so far. It sends the chat with each
// line the player says, appends the NPC's reply when the request completes, trims the oldest turns so that the
// prompt and the reply fit the model's max_seq_len, and saves to / loads from JSON for the save game.
using System;
using System.Collections.Generic;
using System.Text;

namespace Gllm
{
    public sealed class NpcConversation
    {
        /// <summary>A name for logs and save games.</summary>
        public string Name;
        /// <summary>The persona: sent first, as the system message, with every request (and never trimmed).</summary>
        public string SystemPrompt;
        /// <summary>The chat after the system prompt: user and assistant turns, oldest first.</summary>
        public readonly List<ChatMessage> History = new List<ChatMessage>();
        /// <summary>Sampling settings for every reply (MaxTokens defaults to 96); Prompt/Messages/Id are ignored.</summary>
        public GenerateOptions Settings = new GenerateOptions { MaxTokens = 96, Temperature = 0.7 };
        /// <summary>The context the prompt must fit; 0: the server's max_seq_len from the welcome.</summary>
        public int MaxSeqLen;
        /// <summary>Conservative estimate of UTF-8 bytes per token, used for trimming (there is no tokenizer on
        /// the client): lower means more trimming.</summary>
        public double BytesPerToken = 2.5;
        /// <summary>Tokens counted for each message's chat-template wrapping.</summary>
        public int TokensPerMessage = 8;
        /// <summary>The request in flight for this NPC, or null.</summary>
        public string ActiveRequestId { get; private set; }
        /// <summary>The reply streamed so far for the active request.</summary>
        public string PartialReply { get; private set; }

        /// <summary>The reply so far, each time more of it arrives (Poll's thread).</summary>
        public event Action<string> ReplyUpdated;
        /// <summary>The active request ended with a done (stop, length, cancelled by the server...); a reply that
        /// ended with stop or length is in History already.</summary>
        public event Action<DoneInfo> ReplyCompleted;
        /// <summary>(code, message): the active request failed ("disconnected", "too_long", "busy", ...).</summary>
        public event Action<string, string> ReplyFailed;

        GllmClient _client;

        public NpcConversation() { PartialReply = ""; }

        public NpcConversation(string name, string systemPrompt) : this()
        {
            Name = name;
            SystemPrompt = systemPrompt;
        }

        /// <summary>Follows the client's events so that replies are appended by themselves (call once).</summary>
        public void Attach(GllmClient client)
        {
            if (_client == client) return;
            if (_client != null) Detach();
            _client = client;
            client.TextReceived += OnText;
            client.Completed += OnCompleted;
            client.Failed += OnFailed;
        }

        public void Detach()
        {
            if (_client == null) return;
            _client.TextReceived -= OnText;
            _client.Completed -= OnCompleted;
            _client.Failed -= OnFailed;
            _client = null;
        }

        /// <summary>The player says a line: appends it, trims, sends the chat; returns the request id. A request
        /// still running for this NPC is cancelled first (its partial reply is dropped).</summary>
        public string Say(GllmClient client, string line, int? priority = null)
        {
            if (client == null) throw new ArgumentNullException("client");
            Attach(client);
            if (ActiveRequestId != null) Cancel();
            History.Add(ChatMessage.User(line ?? ""));
            var o = (Settings ?? new GenerateOptions()).Clone();
            o.Id = null;
            o.Prompt = null;
            if (priority.HasValue) o.Priority = priority;
            int maxSeq = MaxSeqLen > 0 ? MaxSeqLen : (client.Welcome != null ? (int)client.Welcome.MaxSeqLen : 0);
            Trim(maxSeq, o.MaxTokens ?? 256);
            o.Messages = BuildMessages();
            PartialReply = "";
            ActiveRequestId = client.Generate(o);
            return ActiveRequestId;
        }

        /// <summary>Stops the reply in flight; the player's line stays in the history without an answer.</summary>
        public void Cancel()
        {
            if (ActiveRequestId == null) return;
            if (_client != null) _client.Cancel(ActiveRequestId);
            ActiveRequestId = null;
            PartialReply = "";
        }

        /// <summary>The messages a request sends: the system prompt and the history.</summary>
        public List<ChatMessage> BuildMessages()
        {
            var list = new List<ChatMessage>(History.Count + 1);
            if (!string.IsNullOrEmpty(SystemPrompt)) list.Add(ChatMessage.System(SystemPrompt));
            list.AddRange(History);
            return list;
        }

        /// <summary>Estimated prompt tokens of the current messages.</summary>
        public int EstimateTokens()
        {
            int total = 0;
            if (!string.IsNullOrEmpty(SystemPrompt)) total += Estimate(SystemPrompt);
            foreach (var m in History) total += Estimate(m.Content);
            return total;
        }

        int Estimate(string text)
        {
            int bytes = Encoding.UTF8.GetByteCount(text ?? "");
            return TokensPerMessage + (int)Math.Ceiling(bytes / Math.Max(0.5, BytesPerToken));
        }

        /// <summary>Drops the oldest turns (never the system prompt or the newest message) until the estimated
        /// prompt plus maxNewTokens fits maxSeqLen. Returns how many messages were dropped.</summary>
        public int Trim(int maxSeqLen, int maxNewTokens)
        {
            if (maxSeqLen <= 0) return 0;
            int dropped = 0;
            while (History.Count > 1 && EstimateTokens() + maxNewTokens > maxSeqLen)
            {
                History.RemoveAt(0);
                dropped++;
                // keep the chat starting with a user turn, as chat templates expect
                while (History.Count > 1 && History[0].Role == "assistant") { History.RemoveAt(0); dropped++; }
            }
            return dropped;
        }

        void OnText(string id, string delta, string full)
        {
            if (id != ActiveRequestId) return;
            PartialReply = full;
            var h = ReplyUpdated;
            if (h != null) h(full);
        }

        void OnCompleted(string id, DoneInfo done)
        {
            if (id != ActiveRequestId) return;
            ActiveRequestId = null;
            PartialReply = "";
            if (done.FinishReason == "stop" || done.FinishReason == "length")
                History.Add(ChatMessage.Assistant(done.Text));
            var h = ReplyCompleted;
            if (h != null) h(done);
        }

        void OnFailed(string id, string code, string message)
        {
            if (id != ActiveRequestId) return;
            ActiveRequestId = null;
            PartialReply = "";
            var h = ReplyFailed;
            if (h != null) h(code, message);
        }

        // ---------------------------------------------------------------------------------- save games
        public string ToJson()
        {
            var history = new List<object>(History.Count);
            foreach (var m in History) history.Add(new MsgMap().Set("role", m.Role).Set("content", m.Content));
            var map = new MsgMap()
                .Set("name", Name)
                .Set("system", SystemPrompt)
                .Set("history", history)
                .Set("max_seq_len", (long)MaxSeqLen);
            return Json.Serialize(map);
        }

        public static NpcConversation FromJson(string json)
        {
            var map = Json.Parse(json) as MsgMap;
            if (map == null) throw new JsonException("a conversation is a JSON object");
            var c = new NpcConversation(map.GetString("name"), map.GetString("system"));
            c.MaxSeqLen = (int)(map.GetLong("max_seq_len") ?? 0);
            var history = map.GetList("history");
            if (history != null)
                foreach (var o in history)
                {
                    var m = o as MsgMap;
                    if (m != null) c.History.Add(new ChatMessage(m.GetString("role") ?? "user", m.GetString("content") ?? ""));
                }
            return c;
        }
    }
}
