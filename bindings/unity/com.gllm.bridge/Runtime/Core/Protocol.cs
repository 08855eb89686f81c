// The messages of the gllm bridge protocol v1 (bindings/PROTOCOL.md §5), built in the documented key order so
// that they match the test vectors of §9 byte for byte.
using System;
using System.Collections.Generic;

namespace Gllm
{
    /// <summary>One chat entry of a generate's messages.</summary>
    [Serializable]
    public struct ChatMessage
    {
        public string Role;
        public string Content;

        public ChatMessage(string role, string content) { Role = role; Content = content; }

        public static ChatMessage System(string content) { return new ChatMessage("system", content); }
        public static ChatMessage User(string content) { return new ChatMessage("user", content); }
        public static ChatMessage Assistant(string content) { return new ChatMessage("assistant", content); }

        internal void WriteTo(MsgPackWriter w)
        {
            w.WriteMapHeader(2);
            w.Write("role"); w.Write(Role ?? "");
            w.Write("content"); w.Write(Content ?? "");
        }

        public override string ToString() { return Role + ": " + Content; }
    }

    /// <summary>Every field of a generate message (§5.1), typed; null means "the server's default".
    /// Extra carries fields added to the protocol later (written after the known ones).</summary>
    public sealed class GenerateOptions
    {
        /// <summary>The request id; null: the client picks a unique one.</summary>
        public string Id;
        public string Prompt;
        public List<ChatMessage> Messages;
        public int? MaxTokens;
        public double? Temperature;
        public int? TopK;
        public double? TopP;
        public double? MinP;
        public ulong? Seed;
        public List<string> Stop;
        public int? Logprobs;
        public int? Priority;
        public double? RepetitionPenalty;
        public double? PresencePenalty;
        public double? FrequencyPenalty;
        public bool? IgnoreEos;
        /// <summary>Pace the reply to at most this many tokens a second, [0, 1000] (a line need not come faster
        /// than it is shown or spoken: 15-40 is typical); null or 0: as fast as possible.</summary>
        public double? MaxTokensPerS;
        /// <summary>The first token is wanted within this many milliseconds of submission, [0, 3600000]: among
        /// requests of equal Priority the earliest deadline is served first, and DoneInfo.TtftDeadlineMet says
        /// whether it was met; null or 0: no deadline.</summary>
        public double? TtftDeadlineMs;
        /// <summary>Structured output, at most one of these four (done's text then always parses): a JSON Schema
        /// as its JSON text, a regular expression, a grammar (Lark or GBNF), or a list of allowed outputs.</summary>
        public string JsonSchema;
        public string Regex;
        public string Grammar;
        public List<string> Choice;
        /// <summary>false: never answer this request from the server's prompt-result cache (which answers a
        /// repeated greedy or seeded request at once); null: the server's default (true).</summary>
        public bool? CacheResult;
        /// <summary>true: keep the KV of the request's system messages resident on the server (shared lore that
        /// every NPC reuses) until unpinned.</summary>
        public bool? PinPrefix;
        public MsgMap Extra;

        public GenerateOptions Clone()
        {
            var o = (GenerateOptions)MemberwiseClone();
            if (Messages != null) o.Messages = new List<ChatMessage>(Messages);
            if (Stop != null) o.Stop = new List<string>(Stop);
            if (Choice != null) o.Choice = new List<string>(Choice);
            return o;
        }
    }

    /// <summary>What a done message says about a finished request.</summary>
    public sealed class DoneInfo
    {
        public string Id;
        /// <summary>"stop", "length", "cancelled" or "error".</summary>
        public string FinishReason;
        /// <summary>The whole completion.</summary>
        public string Text;
        public long PromptTokens, CompletionTokens, CachedTokens;
        /// <summary>Submission to first token in the server (null when no token was produced).</summary>
        public double? TtftMs;
        public double TotalMs;
        /// <summary>Whether the first token came within the request's TtftDeadlineMs; null when the request had
        /// no deadline (the server sends it only then).</summary>
        public bool? TtftDeadlineMet;
        /// <summary>What failed, when FinishReason is "error".</summary>
        public string Error;
        /// <summary>The message as received (fields added later).</summary>
        public MsgMap Raw;

        public static DoneInfo FromMessage(MsgMap m)
        {
            var d = new DoneInfo
            {
                Id = m.GetString("id"),
                FinishReason = m.GetString("finish_reason") ?? "",
                Text = m.GetString("text") ?? "",
                Error = m.GetString("error"),
                Raw = m,
            };
            var usage = m.GetMap("usage");
            if (usage != null)
            {
                d.PromptTokens = usage.GetLong("prompt_tokens") ?? 0;
                d.CompletionTokens = usage.GetLong("completion_tokens") ?? 0;
                d.CachedTokens = usage.GetLong("cached_tokens") ?? 0;
            }
            var timings = m.GetMap("timings");
            if (timings != null)
            {
                d.TtftMs = timings.GetDouble("ttft_ms");
                d.TotalMs = timings.GetDouble("total_ms") ?? 0;
                d.TtftDeadlineMet = timings.GetBool("ttft_deadline_met");
            }
            return d;
        }
    }

    /// <summary>What one frame report said (GllmClient.LastFrameReport): the smoothed frame time, the target
    /// (0: none sent, 60 fps), and over the frames since the previous report the longest, how many there were and
    /// how many took over 1.1 x target.</summary>
    public struct FrameReport
    {
        public double Ms, TargetMs, MaxMs;
        public long Frames, Over;

        public byte[] ToMessage()
        {
            return Messages.Frame(Ms, TargetMs > 0 ? TargetMs : (double?)null, MaxMs, Frames, Over);
        }
    }

    /// <summary>The server's welcome (§5.2).</summary>
    public sealed class WelcomeInfo
    {
        public int Version;
        public string Model, Server;
        public long MaxSeqLen;
        public int LeaseMs = 5000, MaxInflight = 16;
        public long MaxMessageBytes = 1 << 20;
        public MsgMap Raw;

        public static WelcomeInfo FromMessage(MsgMap m)
        {
            var w = new WelcomeInfo
            {
                Version = (int)(m.GetLong("v") ?? 1),
                Model = m.GetString("model") ?? "",
                Server = m.GetString("server") ?? "",
                MaxSeqLen = m.GetLong("max_seq_len") ?? 0,
                Raw = m,
            };
            long? lease = m.GetLong("lease_ms");
            if (lease.HasValue && lease.Value > 0) w.LeaseMs = (int)Math.Min(lease.Value, int.MaxValue);
            long? inflight = m.GetLong("max_inflight");
            if (inflight.HasValue && inflight.Value > 0) w.MaxInflight = (int)Math.Min(inflight.Value, int.MaxValue);
            long? maxBytes = m.GetLong("max_message_bytes");
            if (maxBytes.HasValue && maxBytes.Value > 0) w.MaxMessageBytes = maxBytes.Value;
            return w;
        }
    }

    /// <summary>The reply to Snapshot/SnapshotTokens (§5.3): an opaque blob for the save game, holding the KV of
    /// Tokens tokens (whole KV blocks of the conversation). Give Blob to Restore to load it back.</summary>
    public sealed class SnapshotInfo
    {
        public string Id;
        public long Tokens;
        public byte[] Blob;

        public static SnapshotInfo FromMessage(MsgMap m)
        {
            return new SnapshotInfo { Id = m.GetString("id"), Tokens = m.GetLong("tokens") ?? 0, Blob = m["blob"] as byte[] };
        }
    }

    /// <summary>The reply to Restore (§5.3): Tokens tokens of KV are in the server's prefix cache (the next generate
    /// whose prompt starts with them skips their prefill), NewBlocks of them were not cached before.</summary>
    public sealed class RestoreInfo
    {
        public string Id;
        public long Tokens, NewBlocks;

        public static RestoreInfo FromMessage(MsgMap m)
        {
            return new RestoreInfo { Id = m.GetString("id"), Tokens = m.GetLong("tokens") ?? 0, NewBlocks = m.GetLong("new_blocks") ?? 0 };
        }
    }

    /// <summary>The reply to Pin/PinPrompt/PinTokens (§5.3): the pin's name (give it to Unpin; the same prefix always
    /// gets the same name) and how many tokens stay resident (whole KV blocks).</summary>
    public sealed class PinInfo
    {
        public string Id, Pin;
        public long Tokens;

        public static PinInfo FromMessage(MsgMap m)
        {
            return new PinInfo { Id = m.GetString("id"), Pin = m.GetString("pin") ?? "", Tokens = m.GetLong("tokens") ?? 0 };
        }
    }

    /// <summary>The reply to Unpin (§5.3): whether the server had the pin.</summary>
    public sealed class UnpinInfo
    {
        public string Id, Pin;
        public bool Found;

        public static UnpinInfo FromMessage(MsgMap m)
        {
            return new UnpinInfo { Id = m.GetString("id"), Pin = m.GetString("pin") ?? "", Found = m.GetBool("found") ?? false };
        }
    }

    /// <summary>The reply to Embed (§5.3): one unit-length vector per input, in order, and the tokens they cost.</summary>
    public sealed class EmbeddingsInfo
    {
        public string Id;
        public float[][] Vectors;
        public long PromptTokens;

        public static EmbeddingsInfo FromMessage(MsgMap m)
        {
            var list = m.GetList("vectors") ?? new List<object>();
            var vectors = new float[list.Count][];
            for (int i = 0; i < list.Count; i++)
            {
                var v = list[i] as List<object> ?? new List<object>();
                vectors[i] = new float[v.Count];
                for (int j = 0; j < v.Count; j++) vectors[i][j] = (float)(MsgValue.AsDouble(v[j]) ?? double.NaN);
            }
            return new EmbeddingsInfo { Id = m.GetString("id"), Vectors = vectors, PromptTokens = m.GetLong("prompt_tokens") ?? 0 };
        }
    }

    /// <summary>Builders of the client's messages (msgpack bytes, canonical key order).</summary>
    public static class Messages
    {
        public const int ProtocolVersion = 1;

        public static byte[] Hello(string client, string token = null, int v = ProtocolVersion)
        {
            var w = new MsgPackWriter();
            w.WriteMapHeader(token != null ? 4 : 3);
            w.Write("op"); w.Write("hello");
            w.Write("v"); w.Write((long)v);
            w.Write("client"); w.Write(client ?? "");
            if (token != null) { w.Write("token"); w.Write(token); }
            return w.ToArray();
        }

        public static byte[] Generate(string id, GenerateOptions o)
        {
            var w = new MsgPackWriter(new ByteBuffer(256));
            WriteGenerate(w, id, o);
            return w.ToArray();
        }

        static readonly string[] KnownGenerateKeys =
        {
            "op", "id", "prompt", "messages", "max_tokens", "temperature", "top_k", "top_p", "min_p", "seed", "stop",
            "logprobs", "priority", "repetition_penalty", "presence_penalty", "frequency_penalty", "ignore_eos",
            "max_tokens_per_s", "ttft_deadline_ms",
            "json_schema", "regex", "grammar", "choice",
            "cache_result", "pin_prefix",
        };

        public static void WriteGenerate(MsgPackWriter w, string id, GenerateOptions o)
        {
            int n = 2;
            if (o.Prompt != null) n++;
            if (o.Messages != null) n++;
            if (o.MaxTokens.HasValue) n++;
            if (o.Temperature.HasValue) n++;
            if (o.TopK.HasValue) n++;
            if (o.TopP.HasValue) n++;
            if (o.MinP.HasValue) n++;
            if (o.Seed.HasValue) n++;
            if (o.Stop != null) n++;
            if (o.Logprobs.HasValue) n++;
            if (o.Priority.HasValue) n++;
            if (o.RepetitionPenalty.HasValue) n++;
            if (o.PresencePenalty.HasValue) n++;
            if (o.FrequencyPenalty.HasValue) n++;
            if (o.IgnoreEos.HasValue) n++;
            if (o.MaxTokensPerS.HasValue) n++;
            if (o.TtftDeadlineMs.HasValue) n++;
            if (o.JsonSchema != null) n++;
            if (o.Regex != null) n++;
            if (o.Grammar != null) n++;
            if (o.Choice != null) n++;
            if (o.CacheResult.HasValue) n++;
            if (o.PinPrefix.HasValue) n++;
            int extra = 0;
            if (o.Extra != null)
                for (int i = 0; i < o.Extra.Count; i++)
                    if (Array.IndexOf(KnownGenerateKeys, o.Extra.At(i).Key) < 0) extra++;
            w.WriteMapHeader(n + extra);
            w.Write("op"); w.Write("generate");
            w.Write("id"); w.Write(id);
            if (o.Prompt != null) { w.Write("prompt"); w.Write(o.Prompt); }
            if (o.Messages != null)
            {
                w.Write("messages");
                w.WriteArrayHeader(o.Messages.Count);
                for (int i = 0; i < o.Messages.Count; i++) o.Messages[i].WriteTo(w);
            }
            if (o.MaxTokens.HasValue) { w.Write("max_tokens"); w.Write((long)o.MaxTokens.Value); }
            if (o.Temperature.HasValue) { w.Write("temperature"); w.Write(o.Temperature.Value); }
            if (o.TopK.HasValue) { w.Write("top_k"); w.Write((long)o.TopK.Value); }
            if (o.TopP.HasValue) { w.Write("top_p"); w.Write(o.TopP.Value); }
            if (o.MinP.HasValue) { w.Write("min_p"); w.Write(o.MinP.Value); }
            if (o.Seed.HasValue) { w.Write("seed"); w.Write(o.Seed.Value); }
            if (o.Stop != null)
            {
                w.Write("stop");
                w.WriteArrayHeader(o.Stop.Count);
                for (int i = 0; i < o.Stop.Count; i++) w.Write(o.Stop[i]);
            }
            if (o.Logprobs.HasValue) { w.Write("logprobs"); w.Write((long)o.Logprobs.Value); }
            if (o.Priority.HasValue) { w.Write("priority"); w.Write((long)o.Priority.Value); }
            if (o.RepetitionPenalty.HasValue) { w.Write("repetition_penalty"); w.Write(o.RepetitionPenalty.Value); }
            if (o.PresencePenalty.HasValue) { w.Write("presence_penalty"); w.Write(o.PresencePenalty.Value); }
            if (o.FrequencyPenalty.HasValue) { w.Write("frequency_penalty"); w.Write(o.FrequencyPenalty.Value); }
            if (o.IgnoreEos.HasValue) { w.Write("ignore_eos"); w.Write(o.IgnoreEos.Value); }
            if (o.MaxTokensPerS.HasValue) { w.Write("max_tokens_per_s"); w.Write(o.MaxTokensPerS.Value); }
            if (o.TtftDeadlineMs.HasValue) { w.Write("ttft_deadline_ms"); w.Write(o.TtftDeadlineMs.Value); }
            if (o.JsonSchema != null) { w.Write("json_schema"); w.Write(o.JsonSchema); }
            if (o.Regex != null) { w.Write("regex"); w.Write(o.Regex); }
            if (o.Grammar != null) { w.Write("grammar"); w.Write(o.Grammar); }
            if (o.Choice != null)
            {
                w.Write("choice");
                w.WriteArrayHeader(o.Choice.Count);
                for (int i = 0; i < o.Choice.Count; i++) w.Write(o.Choice[i]);
            }
            if (o.CacheResult.HasValue) { w.Write("cache_result"); w.Write(o.CacheResult.Value); }
            if (o.PinPrefix.HasValue) { w.Write("pin_prefix"); w.Write(o.PinPrefix.Value); }
            if (o.Extra != null)
                for (int i = 0; i < o.Extra.Count; i++)
                {
                    var kv = o.Extra.At(i);
                    if (Array.IndexOf(KnownGenerateKeys, kv.Key) >= 0) continue;
                    w.Write(kv.Key); w.Write(kv.Value);
                }
        }

        public static byte[] Cancel(string id)
        {
            var w = new MsgPackWriter(new ByteBuffer(32));
            w.WriteMapHeader(2);
            w.Write("op"); w.Write("cancel");
            w.Write("id"); w.Write(id);
            return w.ToArray();
        }

        /// <summary>A ping; t is echoed back (null for keepalives).</summary>
        public static byte[] Ping(object t)
        {
            var w = new MsgPackWriter(new ByteBuffer(32));
            w.WriteMapHeader(2);
            w.Write("op"); w.Write("ping");
            w.Write("t"); w.Write(t);
            return w.ToArray();
        }

        /// <summary>A frame report: ms (the smoothed frame time), and optionally the target, the longest frame
        /// since the previous report, the frames since it and how many of them took over 1.1 x target.</summary>
        public static byte[] Frame(double ms, double? targetMs, double? maxMs = null, long? frames = null, long? over = null)
        {
            var w = new MsgPackWriter(new ByteBuffer(96));
            int n = 2;
            if (targetMs.HasValue) n++;
            if (maxMs.HasValue) n++;
            if (frames.HasValue) n++;
            if (over.HasValue) n++;
            w.WriteMapHeader(n);
            w.Write("op"); w.Write("frame");
            w.Write("ms"); w.Write(ms);
            if (targetMs.HasValue) { w.Write("target_ms"); w.Write(targetMs.Value); }
            if (maxMs.HasValue) { w.Write("max_ms"); w.Write(maxMs.Value); }
            if (frames.HasValue) { w.Write("frames"); w.Write(frames.Value); }
            if (over.HasValue) { w.Write("over"); w.Write(over.Value); }
            return w.ToArray();
        }

        public static byte[] StatsRequest()
        {
            var w = new MsgPackWriter(new ByteBuffer(16));
            w.WriteMapHeader(1);
            w.Write("op"); w.Write("stats");
            return w.ToArray();
        }

        /// <summary>An idle window: the game will not need the device for the next ms milliseconds.</summary>
        public static byte[] Idle(double ms)
        {
            var w = new MsgPackWriter(new ByteBuffer(24));
            w.WriteMapHeader(2);
            w.Write("op"); w.Write("idle");
            w.Write("ms"); w.Write(ms);
            return w.ToArray();
        }

        /// <summary>A snapshot of a finished conversation (a generate's id) or of token ids: exactly one of them.
        /// encoding: null (the server's "raw") or "int8".</summary>
        public static byte[] Snapshot(string id, string conversation, IList<int> tokens, string encoding)
        {
            var w = new MsgPackWriter(new ByteBuffer(64 + (tokens != null ? 5 * tokens.Count : 0)));
            w.WriteMapHeader(3 + (encoding != null ? 1 : 0));
            w.Write("op"); w.Write("snapshot");
            w.Write("id"); w.Write(id);
            if (conversation != null) { w.Write("conversation"); w.Write(conversation); }
            else WriteTokens(w, tokens);
            if (encoding != null) { w.Write("encoding"); w.Write(encoding); }
            return w.ToArray();
        }

        public static byte[] Restore(string id, byte[] blob)
        {
            var w = new MsgPackWriter(new ByteBuffer(48 + blob.Length));
            w.WriteMapHeader(3);
            w.Write("op"); w.Write("restore");
            w.Write("id"); w.Write(id);
            w.Write("blob"); w.WriteBin(blob, 0, blob.Length);
            return w.ToArray();
        }

        /// <summary>A pin of exactly one of: a raw prompt, chat messages, token ids.</summary>
        public static byte[] Pin(string id, string prompt, IList<ChatMessage> messages, IList<int> tokens)
        {
            var w = new MsgPackWriter(new ByteBuffer(256));
            w.WriteMapHeader(3);
            w.Write("op"); w.Write("pin");
            w.Write("id"); w.Write(id);
            if (prompt != null) { w.Write("prompt"); w.Write(prompt); }
            else if (messages != null)
            {
                w.Write("messages");
                w.WriteArrayHeader(messages.Count);
                for (int i = 0; i < messages.Count; i++) messages[i].WriteTo(w);
            }
            else WriteTokens(w, tokens);
            return w.ToArray();
        }

        public static byte[] Unpin(string id, string pin)
        {
            var w = new MsgPackWriter(new ByteBuffer(64));
            w.WriteMapHeader(3);
            w.Write("op"); w.Write("unpin");
            w.Write("id"); w.Write(id);
            w.Write("pin"); w.Write(pin);
            return w.ToArray();
        }

        /// <summary>Embeddings of 1-256 non-empty texts; pooling: null (the server's "mean") or "last".</summary>
        public static byte[] Embed(string id, IList<string> input, string pooling)
        {
            var w = new MsgPackWriter(new ByteBuffer(128));
            w.WriteMapHeader(3 + (pooling != null ? 1 : 0));
            w.Write("op"); w.Write("embed");
            w.Write("id"); w.Write(id);
            w.Write("input");
            w.WriteArrayHeader(input.Count);
            for (int i = 0; i < input.Count; i++) w.Write(input[i]);
            if (pooling != null) { w.Write("pooling"); w.Write(pooling); }
            return w.ToArray();
        }

        static void WriteTokens(MsgPackWriter w, IList<int> tokens)
        {
            w.Write("tokens");
            w.WriteArrayHeader(tokens.Count);
            for (int i = 0; i < tokens.Count; i++) w.Write((long)tokens[i]);
        }
    }
}
