// The C# runner of the cross-client conformance scenarios (tests/clients/scenarios.json), against a real
// `gllm serve`. Run by tests/test_client_unity.py through tests/clients/harness.py:
//     mono Conformance.exe --spec conformance-spec.json [--only name,name]
// Prints `PASS name` / `FAIL name: why` per scenario, `METRIC name k=v ...`, and `N passed, N failed`.
using System;
using System.Collections.Generic;
using System.Diagnostics;
using System.Globalization;
using System.IO;
using System.Linq;
using System.Net;
using System.Net.Sockets;
using System.Text;
using System.Threading;
using Gllm;

namespace Gllm.Conformance
{
    sealed class CheckFailed : Exception
    {
        public CheckFailed(string message) : base(message) { }
    }

    /// <summary>Records everything a client dispatches, and every breach of the event contract.</summary>
    sealed class Tracker
    {
        public readonly Dictionary<string, StringBuilder> Streamed = new Dictionary<string, StringBuilder>();
        public readonly Dictionary<string, DoneInfo> Done = new Dictionary<string, DoneInfo>();
        public readonly Dictionary<string, string[]> Failures = new Dictionary<string, string[]>();
        public readonly Dictionary<string, int> Ends = new Dictionary<string, int>();
        public readonly List<bool> Connection = new List<bool>();
        public readonly List<string[]> Errors = new List<string[]>();
        public readonly List<MsgMap> Stats = new List<MsgMap>();
        public readonly List<double> Pongs = new List<double>();
        public readonly Dictionary<string, object> Replies = new Dictionary<string, object>();   // NPC-memory answers
        public string Bad;
        public Action<string, DoneInfo> OnCompleted;

        public void Attach(GllmClient c)
        {
            c.TextReceived += (id, delta, full) =>
            {
                if (Ends.ContainsKey(id)) Breach("text for " + id + " after it ended");
                StringBuilder sb;
                if (!Streamed.TryGetValue(id, out sb)) Streamed[id] = sb = new StringBuilder();
                if (delta.Length == 0) Breach("an empty TextReceived for " + id);
                sb.Append(delta);
                if (sb.ToString() != full) Breach("fullSoFar of " + id + " is not the concatenation of its deltas");
            };
            c.Completed += (id, done) =>
            {
                End(id);
                Done[id] = done;
                if (done.Id != id) Breach("Completed(" + id + ") carries done.Id " + done.Id);
                if (OnCompleted != null) OnCompleted(id, done);
            };
            c.Failed += (id, code, message) =>
            {
                End(id);
                Failures[id] = new[] { code, message };
            };
            c.ConnectionChanged += up => Connection.Add(up);
            c.ErrorReceived += (id, code, message) => Errors.Add(new[] { id, code, message });
            c.StatsReceived += m => Stats.Add(m);
            c.PongReceived += rtt => Pongs.Add(rtt);
            c.SnapshotReceived += (id, r) => Reply(id, r, r.Id);
            c.Restored += (id, r) => Reply(id, r, r.Id);
            c.Pinned += (id, r) => Reply(id, r, r.Id);
            c.Unpinned += (id, r) => Reply(id, r, r.Id);
            c.EmbeddingsReceived += (id, r) => Reply(id, r, r.Id);
        }

        void Reply(string id, object reply, string replyId)
        {
            End(id);
            Replies[id] = reply;
            if (replyId != id) Breach("the answer to " + id + " carries the id " + replyId);
        }

        public T Answer<T>(string id) where T : class
        {
            if (Failures.ContainsKey(id)) throw new CheckFailed(id + " failed: " + string.Join(": ", Failures[id]));
            object r;
            if (!Replies.TryGetValue(id, out r)) throw new CheckFailed(id + " got no answer");
            var typed = r as T;
            if (typed == null) throw new CheckFailed(id + " was answered with a " + r.GetType().Name + ", not a " + typeof(T).Name);
            return typed;
        }

        void End(string id)
        {
            int n;
            Ends.TryGetValue(id, out n);
            Ends[id] = n + 1;
            if (n > 0) Breach(id + " ended " + (n + 1) + " times");
        }

        void Breach(string what) { if (Bad == null) Bad = what; }

        public string Text(string id)
        {
            StringBuilder sb;
            return Streamed.TryGetValue(id, out sb) ? sb.ToString() : "";
        }

        public bool Ended(string id) { return Ends.ContainsKey(id); }
    }

    static class Program
    {
        static MsgMap _spec;
        static string _host;
        static int _port;
        static MsgMap _server;

        static int Main(string[] args)
        {
            string specPath = null;
            HashSet<string> only = null;
            for (int i = 0; i < args.Length; i++)
            {
                if (args[i] == "--spec" && i + 1 < args.Length) specPath = args[++i];
                else if (args[i] == "--only" && i + 1 < args.Length) only = new HashSet<string>(args[++i].Split(','));
            }
            if (specPath == null)
            {
                Console.Error.WriteLine("usage: Conformance.exe --spec SPEC.json [--only a,b]");
                return 2;
            }
            _spec = (MsgMap)Json.Parse(File.ReadAllText(specPath, Encoding.UTF8));
            _host = _spec.GetString("host");
            _port = (int)_spec.GetLong("port").Value;
            _server = _spec.GetMap("server");
            int passed = 0, failed = 0;
            foreach (var o in _spec.GetList("scenarios"))
            {
                var sc = (MsgMap)o;
                string name = sc.GetString("name");
                if (only != null && !only.Contains(name)) continue;
                var sw = Stopwatch.StartNew();
                try
                {
                    Run(name, sc);
                    Console.WriteLine("PASS " + name);
                    passed++;
                }
                catch (Exception ex)
                {
                    string why = ex is CheckFailed ? ex.Message : ex.GetType().Name + ": " + ex.Message + " " + ex.StackTrace;
                    Console.WriteLine("FAIL " + name + ": " + why.Replace('\n', ' ').Replace('\r', ' '));
                    failed++;
                }
                Console.WriteLine("METRIC " + name + " wall_s=" + F(sw.Elapsed.TotalSeconds));
                Console.Out.Flush();
            }
            Console.WriteLine(passed + " passed, " + failed + " failed");
            Console.Out.Flush();
            return failed == 0 ? 0 : 1;
        }

        static void Run(string name, MsgMap sc)
        {
            switch (name)
            {
                case "vectors": Vectors(); return;
                case "handshake": Handshake(); return;
                case "fake-peers": FakePeers(); return;
                case "concurrent-generate": ConcurrentGenerate(sc); return;
                case "cancel": CancelMidStream(); return;
                case "duplicate-id": DuplicateId(); return;
                case "busy": Busy(); return;
                case "long-frame": LongFrame(sc); return;
                case "errors": Errors(); return;
                case "warmup-frame-stats": WarmupFrameStats(); return;
                case "pacing-deadline": PacingDeadline(); return;
                case "npc-conversation": Npc(); return;
                case "poll-budget": PollBudget(); return;
                case "lease-stall": LeaseStall(); return;
                case "session-dropped": SessionDropped(); return;
                case "idle-window": IdleWindow(); return;
                case "structured-output": StructuredOutput(sc); return;
                case "pin-unpin": PinUnpin(sc); return;
                case "embed": EmbedScenario(sc); return;
                case "snapshot-restore": SnapshotRestore(sc); return;
                case "server-restart": ServerRestart(sc); return;
                case "poll-cost": PollCost(); return;
                case "shutdown": Shutdown(); return;
            }
            throw new CheckFailed("this runner does not know the scenario '" + name + "'");
        }

        // ------------------------------------------------------------------------------ helpers
        static string F(double v) { return v.ToString("0.####", CultureInfo.InvariantCulture); }

        static void Check(bool ok, string what)
        {
            if (!ok) throw new CheckFailed(what);
        }

        static void Equal(object expected, object actual, string what)
        {
            if (!Equals(expected, actual))
                throw new CheckFailed(what + ": expected " + Show(expected) + ", got " + Show(actual));
        }

        static string Show(object o)
        {
            if (o == null) return "null";
            if (o is string) return Json.Serialize(o);
            return Convert.ToString(o, CultureInfo.InvariantCulture);
        }

        static byte[] Hex(string hex)
        {
            var parts = hex.Split(new[] { ' ', '\n' }, StringSplitOptions.RemoveEmptyEntries);
            return parts.Select(p => byte.Parse(p, NumberStyles.HexNumber, CultureInfo.InvariantCulture)).ToArray();
        }

        static string ToHex(byte[] b, int offset = 0, int count = -1)
        {
            if (count < 0) count = b.Length - offset;
            var sb = new StringBuilder();
            for (int i = 0; i < count; i++) { if (i > 0) sb.Append(' '); sb.Append(b[offset + i].ToString("x2")); }
            return sb.ToString();
        }

        static void SameBytes(byte[] expected, byte[] actual, string what)
        {
            if (expected.Length != actual.Length || !expected.SequenceEqual(actual))
                throw new CheckFailed(what + ": expected " + ToHex(expected) + " | got " + ToHex(actual));
        }

        static GllmClient NewClient(Tracker t, GllmClientOptions options = null, bool wait = true)
        {
            var c = new GllmClient();
            t.Attach(c);
            c.Connect(_host, _port, options ?? new GllmClientOptions { ClientName = "unity-conformance/0.1" });
            if (wait) PumpUntil(c, () => c.IsConnected, 30, "the welcome");
            return c;
        }

        static void PumpUntil(GllmClient c, Func<bool> done, double timeoutS, string what)
        {
            var sw = Stopwatch.StartNew();
            while (!done())
            {
                if (sw.Elapsed.TotalSeconds > timeoutS)
                    throw new CheckFailed("timed out after " + timeoutS + " s waiting for " + what
                                          + " (state " + c.State + ", last error: " + (c.LastError ?? "none") + ")");
                c.Poll(5);
                Thread.Sleep(2);
            }
        }

        /// <summary>Polls for a while to catch anything dispatched after the requests ended.</summary>
        static void Settle(GllmClient c, int ms)
        {
            var sw = Stopwatch.StartNew();
            while (sw.ElapsedMilliseconds < ms) { c.Poll(5); Thread.Sleep(5); }
        }

        static void NoBreach(Tracker t)
        {
            Check(t.Bad == null, "event contract broken: " + t.Bad);
        }

        static GenerateOptions OptionsFrom(MsgMap v)
        {
            var o = new GenerateOptions { Id = v.GetString("id"), Prompt = v.GetString("prompt") };
            var msgs = v.GetList("messages");
            if (msgs != null)
            {
                o.Messages = new List<ChatMessage>();
                foreach (var m in msgs) o.Messages.Add(new ChatMessage(((MsgMap)m).GetString("role"), ((MsgMap)m).GetString("content")));
            }
            if (v.GetLong("max_tokens").HasValue) o.MaxTokens = (int)v.GetLong("max_tokens").Value;
            if (v.GetDouble("temperature").HasValue) o.Temperature = v.GetDouble("temperature");
            if (v.GetLong("top_k").HasValue) o.TopK = (int)v.GetLong("top_k").Value;
            if (v.GetDouble("top_p").HasValue) o.TopP = v.GetDouble("top_p");
            if (v.GetDouble("min_p").HasValue) o.MinP = v.GetDouble("min_p");
            if (v.GetLong("seed").HasValue) o.Seed = (ulong)v.GetLong("seed").Value;
            var stop = v.GetList("stop");
            if (stop != null) o.Stop = stop.Cast<string>().ToList();
            if (v.GetLong("logprobs").HasValue) o.Logprobs = (int)v.GetLong("logprobs").Value;
            if (v.GetLong("priority").HasValue) o.Priority = (int)v.GetLong("priority").Value;
            if (v.GetDouble("repetition_penalty").HasValue) o.RepetitionPenalty = v.GetDouble("repetition_penalty");
            if (v.GetDouble("presence_penalty").HasValue) o.PresencePenalty = v.GetDouble("presence_penalty");
            if (v.GetDouble("frequency_penalty").HasValue) o.FrequencyPenalty = v.GetDouble("frequency_penalty");
            if (v.GetBool("ignore_eos").HasValue) o.IgnoreEos = v.GetBool("ignore_eos");
            if (v.GetDouble("max_tokens_per_s").HasValue) o.MaxTokensPerS = v.GetDouble("max_tokens_per_s");
            if (v.GetDouble("ttft_deadline_ms").HasValue) o.TtftDeadlineMs = v.GetDouble("ttft_deadline_ms");
            o.JsonSchema = v.GetString("json_schema");
            o.Regex = v.GetString("regex");
            o.Grammar = v.GetString("grammar");
            var choice = v.GetList("choice");
            if (choice != null) o.Choice = choice.Cast<string>().ToList();
            o.CacheResult = v.GetBool("cache_result");
            o.PinPrefix = v.GetBool("pin_prefix");
            return o;
        }

        static GenerateOptions Long(string prompt, int maxTokens, string id = null)
        {
            return new GenerateOptions { Id = id, Prompt = prompt, MaxTokens = maxTokens, Temperature = 0.0, IgnoreEos = true };
        }

        static int ServerInt(string key) { return (int)_server.GetLong(key).Value; }

        // ------------------------------------------------------------------------------ vectors
        static readonly string[] ClientOps = { "hello", "generate", "cancel", "ping", "frame", "idle", "pin", "unpin", "embed" };

        static void Vectors()
        {
            var vectors = _spec.GetList("vectors").Cast<MsgMap>().ToList();
            Check(vectors.Count >= 20, "the spec holds only " + vectors.Count + " vectors");
            int msgpack = 0, built = 0, zmtp = 0;
            var zmtpBytes = new Dictionary<string, byte[]>();
            foreach (var v in vectors)
            {
                string name = v.GetString("name");
                byte[] bytes = Hex(v.GetString("hex"));
                string js = v.GetString("json");
                if (js == null) { zmtpBytes[name] = bytes; continue; }
                msgpack++;
                object expected = Json.Parse(js);
                object decoded = MsgPackReader.Decode(bytes);
                Check(MsgValue.DeepEquals(expected, decoded), name + ": decodes to " + Json.Serialize(decoded) + ", not " + js);
                Equal(Json.Serialize(expected), Json.Serialize(decoded), name + ": key order");
                SameBytes(bytes, MsgPackWriter.Encode(expected), name + ": the JSON value encoded");
                SameBytes(bytes, MsgPackWriter.Encode(decoded), name + ": the decoded value re-encoded");
                var m = (MsgMap)expected;
                byte[] mine = Build(name, m);
                if (mine != null)
                {
                    SameBytes(bytes, mine, name + ": the client's builder");
                    built++;
                }
                else if (Array.IndexOf(ClientOps, m.GetString("op")) >= 0)
                    throw new CheckFailed(name + ": a client message vector with no builder check");
                CheckServerMessage(name, m);
            }
            Check(built >= 15, "only " + built + " client vectors were built");
            PacingFieldsEncoding();
            zmtp = CheckZmtp(zmtpBytes);
            CodecEdges();
            Console.WriteLine("METRIC vectors msgpack=" + msgpack + " built=" + built + " zmtp=" + zmtp);
        }

        /// <summary>max_tokens_per_s and ttft_deadline_ms go after ignore_eos, as float64, only when set; the done
        /// timings' ttft_deadline_met is read (null when absent).</summary>
        static void PacingFieldsEncoding()
        {
            var o = new GenerateOptions { Prompt = "Hi", MaxTokens = 4, IgnoreEos = true, MaxTokensPerS = 25, TtftDeadlineMs = 60000 };
            var m = (MsgMap)MsgPackReader.Decode(Messages.Generate("p1", o));
            Equal("op,id,prompt,max_tokens,ignore_eos,max_tokens_per_s,ttft_deadline_ms", string.Join(",", m.Select(kv => kv.Key)),
                  "generate keys with the pacing fields");
            Check(m["max_tokens_per_s"] is double && (double)m["max_tokens_per_s"] == 25.0, "max_tokens_per_s is not the float 25");
            Check(m["ttft_deadline_ms"] is double && (double)m["ttft_deadline_ms"] == 60000.0, "ttft_deadline_ms is not the float 60000");
            var plain = (MsgMap)MsgPackReader.Decode(Messages.Generate("p2", new GenerateOptions { Prompt = "Hi" }));
            Check(!plain.ContainsKey("max_tokens_per_s") && !plain.ContainsKey("ttft_deadline_ms"), "unset pacing fields were sent");
            var extra = new GenerateOptions { Prompt = "Hi", TtftDeadlineMs = 5, Extra = new MsgMap().Set("ttft_deadline_ms", 9.0).Set("later", 1L) };
            var me = (MsgMap)MsgPackReader.Decode(Messages.Generate("p3", extra));
            Equal("op,id,prompt,ttft_deadline_ms,later", string.Join(",", me.Select(kv => kv.Key)), "Extra does not repeat a known key");
            var timings = new MsgMap().Set("ttft_ms", 3.5).Set("total_ms", 9.0);
            var done = new MsgMap().Set("op", "done").Set("id", "p1").Set("timings", timings);
            Check(!DoneInfo.FromMessage(done).TtftDeadlineMet.HasValue, "ttft_deadline_met without a deadline");
            timings.Set("ttft_deadline_met", false);
            Equal((bool?)false, DoneInfo.FromMessage(done).TtftDeadlineMet, "ttft_deadline_met false");
            timings.Set("ttft_deadline_met", true);
            Equal((bool?)true, DoneInfo.FromMessage(done).TtftDeadlineMet, "ttft_deadline_met true");
        }

        static byte[] Build(string name, MsgMap v)
        {
            string op = v.GetString("op");
            if (name == "stats-request") return Messages.StatsRequest();
            switch (op)
            {
                case "hello": return Messages.Hello(v.GetString("client"), v.GetString("token"), (int)v.GetLong("v").Value);
                case "generate": return Messages.Generate(v.GetString("id"), OptionsFrom(v));
                case "cancel": return Messages.Cancel(v.GetString("id"));
                case "ping": return Messages.Ping(v["t"]);
                case "idle": return Messages.Idle(v.GetDouble("ms").Value);
                case "snapshot":
                {
                    if (v.ContainsKey("blob")) return null;   // the server's reply
                    var tokens = v.GetList("tokens");
                    return Messages.Snapshot(v.GetString("id"), v.GetString("conversation"),
                                             tokens == null ? null : tokens.Select(x => (int)MsgValue.AsLong(x).Value).ToList(),
                                             v.GetString("encoding"));
                }
                case "pin":
                {
                    var msgs = v.GetList("messages");
                    var tokens = v.GetList("tokens");
                    return Messages.Pin(v.GetString("id"), v.GetString("prompt"),
                                        msgs == null ? null : msgs.Cast<MsgMap>().Select(x => new ChatMessage(x.GetString("role"), x.GetString("content"))).ToList(),
                                        tokens == null ? null : tokens.Select(x => (int)MsgValue.AsLong(x).Value).ToList());
                }
                case "unpin": return Messages.Unpin(v.GetString("id"), v.GetString("pin"));
                case "embed": return Messages.Embed(v.GetString("id"), v.GetList("input").Cast<string>().ToList(), v.GetString("pooling"));
                case "frame":
                {
                    var bytes = Messages.Frame(v.GetDouble("ms").Value, v.GetDouble("target_ms"), v.GetDouble("max_ms"),
                                               v.GetLong("frames"), v.GetLong("over"));
                    if (v.GetDouble("target_ms").HasValue && v.GetDouble("max_ms").HasValue && v.GetLong("frames").HasValue
                        && v.GetLong("over").HasValue)
                    {
                        var r = new FrameReport
                        {
                            Ms = v.GetDouble("ms").Value, TargetMs = v.GetDouble("target_ms").Value, MaxMs = v.GetDouble("max_ms").Value,
                            Frames = v.GetLong("frames").Value, Over = v.GetLong("over").Value,
                        };
                        SameBytes(bytes, r.ToMessage(), name + ": the FrameReport ReportFrame sends");
                    }
                    return bytes;
                }
            }
            return null;
        }

        /// <summary>The typed views of server messages read the vectors' fields.</summary>
        static void CheckServerMessage(string name, MsgMap m)
        {
            string op = m.GetString("op");
            if (op == "welcome")
            {
                var w = WelcomeInfo.FromMessage(m);
                Equal(1, w.Version, name + " v");
                Equal(m.GetString("model"), w.Model, name + " model");
                Equal(m.GetLong("max_seq_len").Value, w.MaxSeqLen, name + " max_seq_len");
                Equal((int)m.GetLong("lease_ms").Value, w.LeaseMs, name + " lease_ms");
                Equal((int)m.GetLong("max_inflight").Value, w.MaxInflight, name + " max_inflight");
                Equal(m.GetLong("max_message_bytes").Value, w.MaxMessageBytes, name + " max_message_bytes");
            }
            else if (op == "restored")
            {
                var r = RestoreInfo.FromMessage(m);
                Equal(m.GetString("id"), r.Id, name + " id");
                Equal(m.GetLong("tokens").Value, r.Tokens, name + " tokens");
                Equal(m.GetLong("new_blocks").Value, r.NewBlocks, name + " new_blocks");
            }
            else if (op == "pinned")
            {
                var r = PinInfo.FromMessage(m);
                Equal(m.GetString("id"), r.Id, name + " id");
                Equal(m.GetString("pin"), r.Pin, name + " pin");
                Equal(m.GetLong("tokens").Value, r.Tokens, name + " tokens");
            }
            else if (op == "unpinned")
            {
                var r = UnpinInfo.FromMessage(m);
                Equal(m.GetString("pin"), r.Pin, name + " pin");
                Equal(m.GetBool("found").Value, r.Found, name + " found");
            }
            else if (op == "embeddings")
            {
                var r = EmbeddingsInfo.FromMessage(m);
                var vs = m.GetList("vectors");
                Equal(vs.Count, r.Vectors.Length, name + " vectors");
                for (int i = 0; i < vs.Count; i++)
                {
                    var row = (List<object>)vs[i];
                    Equal(row.Count, r.Vectors[i].Length, name + " vector " + i + " length");
                    for (int j = 0; j < row.Count; j++)
                        Equal((float)MsgValue.AsDouble(row[j]).Value, r.Vectors[i][j], name + " vector " + i + "[" + j + "]");
                }
                Equal(m.GetLong("prompt_tokens").Value, r.PromptTokens, name + " prompt_tokens");
            }
            else if (op == "done")
            {
                var d = DoneInfo.FromMessage(m);
                var usage = m.GetMap("usage");
                var timings = m.GetMap("timings");
                Equal(m.GetString("id"), d.Id, name + " id");
                Equal(m.GetString("finish_reason"), d.FinishReason, name + " finish_reason");
                Equal(m.GetString("text"), d.Text, name + " text");
                Equal(usage.GetLong("prompt_tokens").Value, d.PromptTokens, name + " prompt_tokens");
                Equal(usage.GetLong("completion_tokens").Value, d.CompletionTokens, name + " completion_tokens");
                Equal(usage.GetLong("cached_tokens").Value, d.CachedTokens, name + " cached_tokens");
                Equal(timings.GetDouble("ttft_ms"), d.TtftMs, name + " ttft_ms");
                Equal(timings.GetDouble("total_ms").Value, d.TotalMs, name + " total_ms");
                Equal(timings.GetBool("ttft_deadline_met"), d.TtftDeadlineMet, name + " ttft_deadline_met");
            }
        }

        static int CheckZmtp(Dictionary<string, byte[]> v)
        {
            var known = new[] { "zmtp-greeting", "zmtp-ready-dealer", "zmtp-ready-router", "zmtp-ping", "zmtp-pong",
                                "zmtp-frame-ping", "zmtp-frame-long-header", "zmtp-client-opening", "zmtp-frame-hello" };
            foreach (var name in v.Keys)
                Check(Array.IndexOf(known, name) >= 0, "ZMTP vector " + name + " has no check in this runner");
            foreach (var name in known) Check(v.ContainsKey(name), "PROTOCOL.md lacks the vector " + name);
            SameBytes(v["zmtp-greeting"], Zmtp.Greeting(), "zmtp-greeting");
            SameBytes(v["zmtp-ready-dealer"], Zmtp.Ready("DEALER"), "zmtp-ready-dealer");
            SameBytes(v["zmtp-ready-router"], Zmtp.Ready("ROUTER"), "zmtp-ready-router");
            SameBytes(v["zmtp-client-opening"], Zmtp.ClientOpening(), "zmtp-client-opening");
            SameBytes(v["zmtp-frame-ping"], Zmtp.MessageFrame(Messages.Ping(17L)), "zmtp-frame-ping");
            SameBytes(v["zmtp-frame-hello"], Zmtp.MessageFrame(Messages.Hello("unity/0.1")), "zmtp-frame-hello");
            Equal("unity/0.1", new GllmClientOptions().ClientName, "the default client name (vector hello)");
            var header = new ByteBuffer();
            Zmtp.WriteHeader(header, 0, 300);
            SameBytes(v["zmtp-frame-long-header"], header.ToArray(), "zmtp-frame-long-header");
            var longFrame = Zmtp.MessageFrame(new byte[300]);
            SameBytes(v["zmtp-frame-long-header"], longFrame.Take(9).ToArray(), "a 300-byte message frame's header");

            // What the server sends, fed one byte at a time: greeting, READY (ROUTER), PING, a long message frame.
            var stream = new ByteBuffer();
            stream.Add(v["zmtp-greeting"]);
            stream.Add(v["zmtp-ready-router"]);
            stream.Add(v["zmtp-ping"]);
            var big = new MsgMap().Set("op", "done").Set("text", new string('x', 400));
            stream.Add(Zmtp.MessageFrame(MsgPackWriter.Encode(big)));
            stream.Add(v["zmtp-frame-ping"]);
            var reader = new ZmtpReader();
            var frames = new List<string>();
            byte[] data = stream.ToArray();
            for (int i = 0; i < data.Length; i++)
            {
                reader.Feed(data, i, 1);
                byte flags; byte[] body; int off, len;
                while (reader.TryFrame(out flags, out body, out off, out len))
                {
                    if ((flags & Zmtp.FlagCommand) != 0)
                    {
                        int d;
                        string cmd = Zmtp.CommandName(body, off, len, out d);
                        if (cmd == "READY")
                        {
                            var props = Zmtp.ParseProperties(body, d, off + len);
                            Equal("ROUTER", Encoding.ASCII.GetString(props["Socket-Type"]), "READY Socket-Type");
                            Equal(0, props["Identity"].Length, "READY Identity");
                        }
                        if (cmd == "PING")
                            SameBytes(v["zmtp-pong"], Zmtp.Pong(body, d + 2, off + len - d - 2), "zmtp-pong for zmtp-ping");
                        frames.Add(cmd);
                    }
                    else
                    {
                        var m = (MsgMap)MsgPackReader.Decode(body, off, len);
                        frames.Add(m.GetString("op") + ":" + (m.GetString("text") ?? "").Length);
                    }
                }
            }
            Equal("READY,PING,done:400,ping:0", string.Join(",", frames), "frames parsed from the server's byte stream");
            Check(reader.GreetingDone, "the server greeting was not accepted");

            // Greetings a client must refuse (§2.1).
            var curve = Zmtp.Greeting();
            curve[12] = (byte)'C'; curve[13] = (byte)'U'; curve[14] = (byte)'R'; curve[15] = (byte)'V'; curve[16] = (byte)'E';
            ExpectThrows<ZmtpException>(() => Zmtp.CheckGreeting(curve, 0), "a CURVE greeting");
            var notZmtp = Zmtp.Greeting(); notZmtp[0] = 0x48;
            ExpectThrows<ZmtpException>(() => Zmtp.CheckGreeting(notZmtp, 0), "a greeting not starting with ff");
            var v2 = Zmtp.Greeting(); v2[10] = 2;
            ExpectThrows<ZmtpException>(() => Zmtp.CheckGreeting(v2, 0), "a ZMTP 2 greeting");
            var padded = Zmtp.Greeting(); padded[8] = 0x05; padded[11] = 0;   // libzmq's padding, ZMTP 3.0: accepted
            Zmtp.CheckGreeting(padded, 0);
            // MORE parts and frames of any size form: a short-form header for a small body is accepted either way.
            var r2 = new ZmtpReader();
            r2.Feed(Zmtp.Greeting(), 0, 64);
            var longSmall = new ByteBuffer();
            longSmall.Add(0x02); longSmall.AddBigEndian(3, 8); longSmall.Add(new byte[] { 0x81, 0xa0, 0xc0 });
            r2.Feed(longSmall.Data, 0, longSmall.Length);
            byte f2; byte[] b2; int o2, l2;
            Check(r2.TryFrame(out f2, out b2, out o2, out l2) && l2 == 3, "a long-form header on a 3-byte body");
            return v.Count;
        }

        static void ExpectThrows<T>(Action a, string what) where T : Exception
        {
            try { a(); }
            catch (T) { return; }
            throw new CheckFailed(what + " was accepted");
        }

        /// <summary>Every integer width, float32, str/array/map header sizes, and malformed input.</summary>
        static void CodecEdges()
        {
            var ints = new object[] { 0L, 127L, 128L, 255L, 256L, 65535L, 65536L, 4294967295L, 4294967296L, long.MaxValue,
                                      ulong.MaxValue, -1L, -32L, -33L, -128L, -129L, -32768L, -32769L, -2147483648L,
                                      -2147483649L, long.MinValue };
            var heads = new[] { "00", "7f", "cc", "cc", "cd", "cd", "ce", "ce", "cf", "cf", "cf", "ff", "e0", "d0", "d0", "d1",
                                "d1", "d2", "d2", "d3", "d3" };
            for (int i = 0; i < ints.Length; i++)
            {
                var b = MsgPackWriter.Encode(ints[i]);
                Equal(heads[i], b[0].ToString("x2"), "the header of " + ints[i]);
                Check(MsgValue.DeepEquals(ints[i], MsgPackReader.Decode(b)), ints[i] + " round-trips");
            }
            Equal(1.5, MsgPackReader.Decode(Hex("ca 3f c0 00 00")), "float32 1.5");
            Equal(-5L, MsgPackReader.Decode(Hex("d3 ff ff ff ff ff ff ff fb")), "int64 -5 (not shortest) decodes");
            Equal(7L, MsgPackReader.Decode(Hex("cf 00 00 00 00 00 00 00 07")), "uint64 7 (not shortest) decodes");
            foreach (int n in new[] { 31, 32, 255, 256, 65535, 65536 })
            {
                string s = new string('a', n);
                var b = MsgPackWriter.Encode(s);
                string head = n <= 31 ? "bf" : n <= 255 ? "d9" : n <= 65535 ? "da" : "db";
                Equal(head, b[0].ToString("x2"), "the str header of " + n + " bytes");
                Equal(s, MsgPackReader.Decode(b), "a " + n + "-byte string round-trips");
            }
            var list = Enumerable.Range(0, 16).Select(i => (object)(long)i).ToList();
            var lb = MsgPackWriter.Encode(list);
            Equal("dc", lb[0].ToString("x2"), "array16 header");
            Check(MsgValue.DeepEquals(list, MsgPackReader.Decode(lb)), "array16 round-trips");
            var map = new MsgMap();
            for (int i = 0; i < 16; i++) map.Set("k" + i, (long)i);
            var mb = MsgPackWriter.Encode(map);
            Equal("de", mb[0].ToString("x2"), "map16 header");
            Check(MsgValue.DeepEquals(map, MsgPackReader.Decode(mb)), "map16 round-trips");
            Equal("\u00c7a \U0001F409", MsgPackReader.Decode(MsgPackWriter.Encode("\u00c7a \U0001F409")), "UTF-8 with a 4-byte character");
            ExpectThrows<MsgPackException>(() => MsgPackReader.Decode(Hex("82 a2 6f 70")), "truncated msgpack");
            ExpectThrows<MsgPackException>(() => MsgPackReader.Decode(Hex("c0 c0")), "trailing bytes");
            ExpectThrows<MsgPackException>(() => MsgPackReader.Decode(Hex("dd 7f ff ff ff")), "an absurd array length");
            ExpectThrows<MsgPackException>(() => MsgPackReader.Decode(Hex("81 01 02")), "an integer map key");
            ExpectThrows<MsgPackException>(() => MsgPackReader.Decode(Hex("c1")), "the never-used byte c1");
            // JSON: the float/int convention, escapes, round trip.
            Equal(0.0, Json.Parse("0.0"), "JSON 0.0 is a float");
            Equal(7L, Json.Parse("7"), "JSON 7 is an int");
            string tricky = "{\"a\":\"q\\\"\\\\\\n\\u00e9\\ud83d\\udc09\",\"b\":[1,2.5,true,null,{}],\"c\":18446744073709551615}";
            var parsed = Json.Parse(tricky);
            Check(MsgValue.DeepEquals(parsed, Json.Parse(Json.Serialize(parsed))), "JSON round trip");
            Equal("q\"\\\n\u00e9\U0001F409", ((MsgMap)parsed).GetString("a"), "JSON escapes");
            Equal(ulong.MaxValue, ((MsgMap)parsed)["c"], "JSON uint64");
        }

        // ------------------------------------------------------------------------------ server scenarios
        static void Handshake()
        {
            var t = new Tracker();
            using (var c = NewClient(t))
            {
                var w = c.Welcome;
                Equal(1, w.Version, "welcome.v");
                Equal((long)ServerInt("max_seq_len"), w.MaxSeqLen, "welcome.max_seq_len");
                Equal(ServerInt("lease_ms"), w.LeaseMs, "welcome.lease_ms");
                Equal(ServerInt("max_inflight"), w.MaxInflight, "welcome.max_inflight");
                Equal((long)ServerInt("max_message_bytes"), w.MaxMessageBytes, "welcome.max_message_bytes");
                Check(w.Model.Length > 0, "welcome.model is empty");
                Check(w.Server.StartsWith("gllm/"), "welcome.server is " + w.Server);
                c.Ping();
                PumpUntil(c, () => t.Pongs.Count == 1, 30, "the pong");
                Check(t.Pongs[0] >= 0, "a negative round trip");
                c.Stats();
                PumpUntil(c, () => t.Stats.Count == 1, 30, "the stats");
                var s = t.Stats[0];
                Check(s.GetLong("clients") >= 1, "stats.clients " + s.GetLong("clients"));
                Equal(0L, s.GetLong("inflight"), "stats.inflight");
                Check(s.GetLong("kv_total_blocks") > 0, "stats.kv_total_blocks");
                Settle(c, 100);
                Equal("True", string.Join(",", t.Connection), "ConnectionChanged events");
                Check(t.Errors.Count == 0, "unexpected errors: " + Errs(t));
                Console.WriteLine("METRIC handshake rtt_ms=" + F(t.Pongs[0]) + " model=" + w.Model);
            }
        }

        static void FakePeers()
        {
            var ports = _spec.GetMap("fake_peers");
            Check(ports != null && ports.Count >= 4, "the spec has no fake peers");
            RefusedBy((int)ports.GetLong("curve").Value, "CURVE");
            RefusedBy((int)ports.GetLong("error").Value, "no entry");
            RefusedBy((int)ports.GetLong("silent").Value, "no welcome");

            var t = new Tracker();
            var c = new GllmClient();
            t.Attach(c);
            c.Connect("127.0.0.1", (int)ports.GetLong("scripted").Value, new GllmClientOptions { ClientName = "unity-conformance/0.1" });
            try
            {
                PumpUntil(c, () => t.Connection.Count == 1, 30, "the scripted peer's welcome");
                var w = c.Welcome;
                Equal("fake", w.Model, "the joined welcome's model");
                Equal(60000, w.LeaseMs, "the joined welcome's lease_ms");
                Equal(4, w.MaxInflight, "the joined welcome's max_inflight");
                string id = c.Generate(Long("Hi", 2));
                PumpUntil(c, () => t.Ended(id), 30, "the scripted reply");
                Check(t.Done.ContainsKey(id), "the scripted request failed: " + (t.Failures.ContainsKey(id) ? string.Join(": ", t.Failures[id]) : ""));
                var d = t.Done[id];
                Equal("Hello", d.Text, "done.text joined from 3 MORE parts");
                Equal("Hello", t.Text(id), "the streamed text");
                Equal("stop", d.FinishReason, "finish_reason");
                Equal(3L, d.CachedTokens, "cached_tokens");
                Check(!d.TtftMs.HasValue, "ttft_ms nil");
                Equal(1.5, d.TotalMs, "total_ms");
                Check(d.Raw.ContainsKey("extra"), "the raw done keeps unknown keys");
                Check(!t.Streamed.ContainsKey("not-mine"), "text of an unknown id was delivered");
                c.Stats();
                PumpUntil(c, () => t.Stats.Count == 1, 30, "the scripted stats");
                var s = t.Stats[0];
                Equal(1L, s.GetLong("pong_ok"), "the PONG echoed the PING's context");
                Equal(0L, s.GetLong("hello_before_ready"), "a message sent before the server's READY");
                Equal("unity-conformance/0.1", s.GetString("client"), "hello.client");
                Check(t.Errors.Count == 0, "errors from ignorable input: " + Errs(t));
                NoBreach(t);
            }
            finally
            {
                c.Close();
            }
        }

        static void RefusedBy(int port, string why)
        {
            var t = new Tracker();
            var c = new GllmClient();
            t.Attach(c);
            c.Connect("127.0.0.1", port, new GllmClientOptions { HandshakeTimeoutMs = 500, ReconnectMinMs = 100 });
            try
            {
                string id = c.Generate(Long("Anyone?", 4));
                PumpUntil(c, () => t.Ended(id), 30, "the refusal (" + why + ")");
                Check(t.Failures.ContainsKey(id), "the request to a refusing peer did not fail (" + why + ")");
                Equal("disconnected", t.Failures[id][0], "its code (" + why + ")");
                Check(t.Failures[id][1].Contains(why), "the failure does not say '" + why + "': " + t.Failures[id][1]);
                Equal(0, t.Connection.Count, "ConnectionChanged events from a refusing peer (" + why + ")");
                NoBreach(t);
            }
            finally
            {
                c.Close();
            }
        }

        static string Errs(Tracker t) { return string.Join("; ", t.Errors.Select(e => string.Join("|", e))); }

        static void CompareWithReference(Tracker t, MsgMap r)
        {
            string id = r.GetString("id");
            Check(t.Ended(id), id + " did not end");
            Check(!t.Failures.ContainsKey(id), id + " failed: " + (t.Failures.ContainsKey(id) ? string.Join(": ", t.Failures[id]) : ""));
            var d = t.Done[id];
            Equal(d.Text, t.Text(id), id + ": the streamed text vs done.text");
            Equal(r.GetString("expected_text"), d.Text, id + ": the text vs the Python client's");
            Equal(r.GetLong("max_tokens").Value, d.CompletionTokens, id + ": completion_tokens");
            Equal("length", d.FinishReason, id + ": finish_reason");
        }

        static void ConcurrentGenerate(MsgMap sc)
        {
            var refs = sc.GetList("reference").Cast<MsgMap>().ToList();
            Check(refs.Count == 4, "4 reference requests expected");
            Check(refs.Any(r => r.GetString("expected_text").Length > 0), "every reference text is empty");
            var t = new Tracker();
            var logprobs = new Dictionary<string, List<object>>();
            using (var c = NewClient(t))
            {
                c.LogprobsReceived += (id, entries) =>
                {
                    List<object> all;
                    if (!logprobs.TryGetValue(id, out all)) logprobs[id] = all = new List<object>();
                    all.AddRange(entries);
                };
                foreach (var r in refs) Equal(r.GetString("id"), c.Generate(OptionsFrom(r)), "Generate's id");
                PumpUntil(c, () => refs.All(r => t.Ended(r.GetString("id"))), 120, "4 requests");
                Settle(c, 200);
                foreach (var r in refs) CompareWithReference(t, r);
                foreach (var r in refs)
                {
                    string id = r.GetString("id");
                    long? want = r.GetLong("logprobs");
                    if (!want.HasValue)
                    {
                        Check(!logprobs.ContainsKey(id), id + " got logprobs it did not ask for");
                        continue;
                    }
                    Check(logprobs.ContainsKey(id), id + " got no logprobs");
                    Equal(t.Done[id].CompletionTokens, (long)logprobs[id].Count, id + ": logprob entries");
                    foreach (MsgMap e in logprobs[id])
                    {
                        Check(e.GetLong("token").HasValue && e["logprob"] is double, id + ": a logprob entry " + Json.Serialize(e));
                        Equal((int)want.Value, e.GetList("top").Count, id + ": top alternatives");
                    }
                }
                NoBreach(t);
                Equal(0, c.PendingRequests, "PendingRequests after all ended");
                Equal(0, c.InFlight, "InFlight after all ended");
            }
        }

        static void CancelMidStream()
        {
            var t = new Tracker();
            using (var c = NewClient(t))
            {
                string id = c.Generate(Long("Once upon a time in Eldmoor", 200));
                PumpUntil(c, () => t.Text(id).Length > 0 || t.Ended(id), 60, "the first text");
                Check(!t.Ended(id), "the request ended before it could be cancelled");
                c.Cancel(id);
                PumpUntil(c, () => t.Ended(id), 60, "the cancelled request's end");
                c.Cancel(id);              // no longer in flight: ignored
                c.Cancel("never-sent");
                c.Ping();
                PumpUntil(c, () => t.Pongs.Count == 1, 30, "a pong after the cancels");
                Settle(c, 100);
                Check(!t.Failures.ContainsKey(id), "the cancelled request Failed instead of Completed");
                var d = t.Done[id];
                Equal("cancelled", d.FinishReason, "finish_reason");
                Check(d.CompletionTokens < 200, "completion_tokens " + d.CompletionTokens + " after a cancel");
                Equal(d.Text, t.Text(id), "the streamed text vs done.text");
                Check(t.Errors.Count == 0, "unexpected errors: " + Errs(t));
                NoBreach(t);
            }
        }

        static void DuplicateId()
        {
            var t = new Tracker();
            using (var c = NewClient(t))
            {
                c.Generate(Long("The guard said", 60, "dup"));
                c.Generate(Long("The guard said", 60, "dup"));
                PumpUntil(c, () => t.Ended("dup") && t.Errors.Count > 0, 60, "the request's end and the duplicate_id error");
                Settle(c, 200);
                Equal(1, t.Errors.Count, "errors");
                Equal("dup|duplicate_id", t.Errors[0][0] + "|" + t.Errors[0][1], "the error");
                Check(!t.Failures.ContainsKey("dup"), "the original request Failed: " + (t.Failures.ContainsKey("dup") ? t.Failures["dup"][0] : ""));
                var d = t.Done["dup"];
                Equal("length", d.FinishReason, "the original's finish_reason");
                Equal(60L, d.CompletionTokens, "the original's completion_tokens");
                Equal(d.Text, t.Text("dup"), "the streamed text vs done.text");
                Equal(0, c.InFlight, "InFlight (the duplicate has no end of its own)");
                NoBreach(t);
            }
        }

        static void Busy()
        {
            var t = new Tracker();
            using (var c = NewClient(t))
            {
                int max = c.Welcome.MaxInflight;
                var ids = new List<string>();
                for (int i = 0; i <= max; i++) ids.Add(c.Generate(Long("Busy market day number " + i, 200)));
                string last = ids[max];
                PumpUntil(c, () => t.Ended(last), 60, "the busy answer");
                Check(t.Failures.ContainsKey(last), "request " + (max + 1) + " of " + (max + 1) + " did not fail");
                Equal("busy", t.Failures[last][0], "its code");
                foreach (var id in ids.Take(max)) c.Cancel(id);
                PumpUntil(c, () => ids.All(t.Ended), 120, "the cancelled requests");
                Settle(c, 200);
                foreach (var id in ids.Take(max))
                {
                    Check(!t.Failures.ContainsKey(id), id + " failed: " + (t.Failures.ContainsKey(id) ? string.Join(": ", t.Failures[id]) : ""));
                    Equal(t.Done[id].Text, t.Text(id), id + ": the streamed text vs done.text");
                }
                Check(ids.Take(max).Any(id => t.Done[id].FinishReason == "cancelled"), "no request was cancelled");
                Equal(0, c.InFlight, "InFlight after all ended");
                NoBreach(t);
            }
        }

        static void LongFrame(MsgMap sc)
        {
            var r = sc.GetList("reference").Cast<MsgMap>().Single();
            var o = OptionsFrom(r);
            int size = Messages.Generate(o.Id, o).Length;
            Check(size > 255, "the request is only " + size + " bytes: not a long frame");
            var t = new Tracker();
            using (var c = NewClient(t))
            {
                c.Generate(o);
                PumpUntil(c, () => t.Ended(o.Id), 60, "the request");
                CompareWithReference(t, r);
                NoBreach(t);
            }
            Console.WriteLine("METRIC long-frame request_bytes=" + size);
        }

        static void Errors()
        {
            var t = new Tracker();
            using (var c = NewClient(t))
            {
                string bad = c.Generate(new GenerateOptions { Prompt = "Hello", Temperature = -1.0, MaxTokens = 4 });
                string huge = c.Generate(new GenerateOptions
                {
                    Prompt = string.Concat(Enumerable.Repeat("the dragon sleeps under the hill ", 120)), MaxTokens = 4,
                });
                PumpUntil(c, () => t.Ended(bad) && t.Ended(huge), 60, "the two errors");
                Check(t.Failures.ContainsKey(bad), "the bad request did not fail");
                Equal("bad_request", t.Failures[bad][0], "the bad request's code");
                Check(t.Failures[bad][1].Contains("temperature"), "the message does not name the field: " + t.Failures[bad][1]);
                Check(t.Failures.ContainsKey(huge), "the too-long request did not fail");
                Equal("too_long", t.Failures[huge][0], "the long prompt's code");
                string ok = c.Generate(Long("Afterwards", 4));
                PumpUntil(c, () => t.Ended(ok), 60, "a request after the errors");
                Check(t.Done.ContainsKey(ok), "the request after the errors did not complete");
                Settle(c, 100);
                Equal("True", string.Join(",", t.Connection), "ConnectionChanged events");
                NoBreach(t);
            }
        }

        const string Lore = "You are a character in Eldmoor, a cold river town ruled by Duke Aldric from the grey keep on the "
            + "hill. The old stone bridge is guarded by river spirits, the north road is closed since the dragon woke, "
            + "merchants trade furs and salt at the market, and the bards sing of the fallen king every night at the inn.";

        static void WarmupFrameStats()
        {
            var t = new Tracker();
            using (var c = NewClient(t))
            {
                string w = c.Warmup(new[] { ChatMessage.System(Lore), ChatMessage.User("Hello.") });
                PumpUntil(c, () => t.Ended(w), 60, "the warmup");
                Check(t.Done.ContainsKey(w), "the warmup did not complete: " + (t.Failures.ContainsKey(w) ? string.Join(": ", t.Failures[w]) : ""));
                Check(t.Done[w].CompletionTokens <= 1, "the warmup generated " + t.Done[w].CompletionTokens + " tokens");
                string id = c.Generate(new GenerateOptions
                {
                    Messages = new List<ChatMessage> { ChatMessage.System(Lore), ChatMessage.User("Who rules the town?") },
                    MaxTokens = 4, Temperature = 0.0,
                });
                for (int i = 0; i < 12; i++)
                {
                    c.ReportFrame(16.0 + i % 3, 16.6);
                    c.Poll(1);
                    Thread.Sleep(30);
                }
                PumpUntil(c, () => t.Ended(id), 60, "the request after the warmup");
                Check(t.Done.ContainsKey(id), "the request after the warmup did not complete");
                Check(t.Done[id].CachedTokens > 0, "cached_tokens is 0: the warmup did not fill the prefix cache");
                c.Stats();
                PumpUntil(c, () => t.Stats.Count == 1, 30, "the stats");
                Check(t.Stats[0].GetLong("prefix_cache_hits") > 0, "stats.prefix_cache_hits is 0");
                Settle(c, 100);
                Check(t.Errors.Count == 0, "errors after frame reports: " + Errs(t));

                // Frames of 30 ms against 16.6 (all over 1.1 x target), once per 16 ms frame for 2 s, while a long
                // request runs: the engine yields (governor_duty_pct below 100).
                string busy = c.Generate(Long("The long winter in Eldmoor began when", 200));
                PumpUntil(c, () => t.Text(busy).Length > 0 || t.Ended(busy), 60, "the long request's first text");
                long reportsBefore = c.FrameReports;
                long overReported = 0, reports = 0, calls = 0, callsAtReport = 0;
                var clock = Stopwatch.StartNew();
                double next = 0;
                while (clock.ElapsedMilliseconds < 2000)
                {
                    c.ReportFrame(30, 16.6);
                    calls++;
                    if (c.FrameReports != reportsBefore + reports)
                    {
                        reports++;
                        Equal(reportsBefore + reports, c.FrameReports, "frame reports sent by one ReportFrame");
                        var r = c.LastFrameReport;
                        // The first report may also count the frames of 16-18 ms reported above since the last one.
                        if (reports == 1)
                            Check(r.Over >= 1 && r.Frames - r.Over <= 12, "the first slow report: " + r.Frames + " frames, " + r.Over + " over");
                        else
                            Check(r.Frames >= 1 && r.Over == r.Frames, "a report of " + r.Frames + " frames with " + r.Over + " over (all are over)");
                        Equal(30.0, r.MaxMs, "the report's max_ms");
                        Equal(16.6, r.TargetMs, "the report's target_ms");
                        Check(r.Ms >= 16.0 && r.Ms <= 30.0 + 1e-9, "the report's smoothed ms " + r.Ms);
                        var sent = (MsgMap)MsgPackReader.Decode(r.ToMessage());
                        Equal("op,ms,target_ms,max_ms,frames,over", string.Join(",", sent.Select(kv => kv.Key)), "the report's keys");
                        overReported += r.Over;
                        callsAtReport = calls;
                    }
                    c.Poll(1);
                    next += 16;
                    double sleep = next - clock.Elapsed.TotalMilliseconds;
                    if (sleep > 0) Thread.Sleep((int)sleep);
                }
                Check(reports >= 5, "only " + reports + " frame reports in 2 s (one per 250 ms expected)");
                Check(reports <= 2000 / 250 + 2, reports + " frame reports in 2 s (one per 250 ms expected)");
                Equal(callsAtReport, overReported, "slow frames counted by the reports up to the last one (each frame once: the counts start again after each report)");
                c.Stats();
                PumpUntil(c, () => t.Stats.Count == 2, 30, "the stats after the slow frames");
                long? duty = t.Stats[1].GetLong("governor_duty_pct");
                Check(duty.HasValue, "stats has no governor_duty_pct");
                Check(duty.Value < 100, "governor_duty_pct is " + duty.Value + " after 2 s of frames over target");
                c.Cancel(busy);
                PumpUntil(c, () => t.Ended(busy), 60, "the long request's end");
                Settle(c, 100);
                Check(t.Done.ContainsKey(busy), "the long request failed: " + (t.Failures.ContainsKey(busy) ? string.Join(": ", t.Failures[busy]) : ""));
                Equal(1, t.Ends[busy], "ends of the long request");
                Equal(t.Done[busy].Text, t.Text(busy), "the long request's streamed text vs done.text");
                Check(t.Errors.Count == 0, "errors after the slow frames: " + Errs(t));
                NoBreach(t);
                Console.WriteLine("METRIC warmup-frame-stats cached_tokens=" + t.Done[id].CachedTokens
                                  + " prompt_tokens=" + t.Done[id].PromptTokens + " frame_reports=" + reports
                                  + " frames=" + calls + " governor_duty_pct=" + duty.Value
                                  + " long_finish=" + t.Done[busy].FinishReason + " long_tokens=" + t.Done[busy].CompletionTokens);
            }
        }

        static void PacingDeadline()
        {
            var t = new Tracker();
            using (var c = NewClient(t))
            {
                var clock = Stopwatch.StartNew();
                double firstText = -1, completedAt = -1;
                var o = Long("The bard stood up and sang of the old bridge", 20, "paced");
                o.MaxTokensPerS = 25;
                o.TtftDeadlineMs = 60000;
                c.TextReceived += (rid, delta, full) => { if (rid == "paced" && firstText < 0) firstText = clock.Elapsed.TotalMilliseconds; };
                c.Completed += (rid, done) => { if (rid == "paced") completedAt = clock.Elapsed.TotalMilliseconds; };
                string id = c.Generate(o);
                PumpUntil(c, () => t.Ended(id), 60, "the paced request");
                Check(t.Done.ContainsKey(id), "the paced request failed: " + (t.Failures.ContainsKey(id) ? string.Join(": ", t.Failures[id]) : ""));
                var d = t.Done[id];
                Equal("length", d.FinishReason, "the paced request's finish_reason");
                Equal(20L, d.CompletionTokens, "the paced request's completion_tokens");
                Equal(d.Text, t.Text(id), "the paced request's streamed text vs done.text");
                Check(d.TtftDeadlineMet.HasValue, "done.timings has no ttft_deadline_met for a request with a deadline");
                Check(d.TtftDeadlineMet.Value, "ttft_deadline_met is false with a 60 s deadline (ttft_ms " + Show(d.TtftMs) + ")");
                Check(firstText >= 0, "no text event for the paced request");
                double spread = completedAt - firstText;
                Check(spread >= 600, "the paced request's first text to its Completed took " + F(spread) + " ms (19 tokens at 25/s: 760 ms)");

                string fast = c.Generate(new GenerateOptions { Prompt = "Too fast", MaxTokens = 4, MaxTokensPerS = 5000 });
                string late = c.Generate(new GenerateOptions { Prompt = "Too late", MaxTokens = 4, TtftDeadlineMs = -1 });
                PumpUntil(c, () => t.Ended(fast) && t.Ended(late), 60, "the two refusals");
                Check(t.Failures.ContainsKey(fast), "max_tokens_per_s 5000 was not refused");
                Equal("bad_request", t.Failures[fast][0], "max_tokens_per_s 5000's code");
                Check(t.Failures[fast][1].Contains("max_tokens_per_s"), "the message does not name max_tokens_per_s: " + t.Failures[fast][1]);
                Check(t.Failures.ContainsKey(late), "ttft_deadline_ms -1 was not refused");
                Equal("bad_request", t.Failures[late][0], "ttft_deadline_ms -1's code");
                Check(t.Failures[late][1].Contains("ttft_deadline_ms"), "the message does not name ttft_deadline_ms: " + t.Failures[late][1]);
                Settle(c, 100);
                Check(t.Errors.Count == 0, "unexpected errors: " + Errs(t));
                NoBreach(t);
                Console.WriteLine("METRIC pacing-deadline first_text_to_done_ms=" + F(spread) + " ttft_ms=" + Show(d.TtftMs)
                                  + " total_ms=" + F(d.TotalMs));
            }
        }

        static void Npc()
        {
            var t = new Tracker();
            using (var c = NewClient(t))
            {
                var npc = new NpcConversation("guard", "You are Brann, a tired town guard of Eldmoor.");
                npc.Settings = new GenerateOptions { MaxTokens = 8, Temperature = 0.0, IgnoreEos = true };
                string id = npc.Say(c, "Halt! Who goes there?");
                Equal(id, npc.ActiveRequestId, "ActiveRequestId");
                PumpUntil(c, () => t.Ended(id), 60, "the reply");
                Check(t.Done.ContainsKey(id), "the reply did not complete");
                Check(npc.ActiveRequestId == null, "ActiveRequestId after the reply");
                Equal(2, npc.History.Count, "history entries");
                Equal("assistant", npc.History[1].Role, "the reply's role");
                Equal(t.Done[id].Text, npc.History[1].Content, "the reply in the history");
                Equal(t.Text(id), npc.History[1].Content, "the streamed reply");

                // A history far over max_seq_len: sent untrimmed the server refuses it; Say trims it to fit.
                for (int i = 0; i < 30; i++)
                {
                    npc.History.Add(ChatMessage.User("Tell me again about the dragon on the north road, turn " + i + ", all of it."));
                    npc.History.Add(ChatMessage.Assistant("The dragon sleeps in the hills past the old watchtower, and the road is closed, turn " + i + "."));
                }
                int before = npc.History.Count;
                var untrimmed = npc.BuildMessages();
                untrimmed.Add(ChatMessage.User("And now?"));
                string raw = c.Generate(new GenerateOptions { Messages = untrimmed, MaxTokens = 8 });
                string trimmed = npc.Say(c, "And now?");
                PumpUntil(c, () => t.Ended(raw) && t.Ended(trimmed), 60, "the untrimmed and trimmed requests");
                Check(t.Failures.ContainsKey(raw) && t.Failures[raw][0] == "too_long", "the untrimmed chat was not refused as too_long");
                Check(t.Done.ContainsKey(trimmed), "the trimmed chat failed: " + (t.Failures.ContainsKey(trimmed) ? string.Join(": ", t.Failures[trimmed]) : ""));
                Check(npc.History.Count < before, "nothing was trimmed");
                Equal("user", npc.History[0].Role, "the trimmed history starts with");
                Equal(t.Done[trimmed].Text, npc.History[npc.History.Count - 1].Content, "the reply after trimming");
                Check(t.Done[trimmed].PromptTokens + 8 <= c.Welcome.MaxSeqLen, "the trimmed prompt does not fit");

                // Save and load.
                npc.History.Add(ChatMessage.User("\u00c7a va? \"quoted\"\nnew line \U0001F409"));
                string json = npc.ToJson();
                var loaded = NpcConversation.FromJson(json);
                Equal(json, loaded.ToJson(), "ToJson after FromJson");
                Equal(npc.History.Count, loaded.History.Count, "history entries after loading");
                Equal(npc.History[npc.History.Count - 1].Content, loaded.History[loaded.History.Count - 1].Content, "the last entry after loading");
                Equal(npc.SystemPrompt, loaded.SystemPrompt, "the persona after loading");
                NoBreach(t);
                Console.WriteLine("METRIC npc-conversation trimmed_from=" + before + " trimmed_to=" + (npc.History.Count - 2)
                                  + " prompt_tokens=" + t.Done[trimmed].PromptTokens);
            }
        }

        static void PollBudget()
        {
            var t = new Tracker();
            var order = new List<string>();
            using (var c = NewClient(t))
            {
                Settle(c, 50);
                c.TextReceived += (id, delta, full) => order.Add("text:" + id);
                c.Completed += (id, done) => order.Add("done:" + id);
                string a = c.Generate(Long("Budget story one", 24, "pb-a"));
                string b = c.Generate(Long("Budget story two", 24, "pb-b"));
                var sw = Stopwatch.StartNew();
                while (c.InFlight > 0)      // no Poll: everything stays queued
                {
                    Check(sw.Elapsed.TotalSeconds < 60, "the requests did not end within 60 s");
                    Thread.Sleep(10);
                }
                Equal(0, order.Count, "events dispatched without Poll");
                int calls = 0;
                while (true)
                {
                    int n = c.Poll(0);
                    if (n == 0) break;
                    Equal(1, n, "events dispatched by Poll(0)");
                    Check(++calls <= 100, "Poll(0) keeps dispatching");
                }
                Equal(4, calls, "Poll(0) calls with an event (two merged texts, two ends)");
                Check(order.IndexOf("text:" + a) >= 0 && order.IndexOf("text:" + a) < order.IndexOf("done:" + a), "a's text, then its end: " + string.Join(",", order));
                Check(order.IndexOf("text:" + b) >= 0 && order.IndexOf("text:" + b) < order.IndexOf("done:" + b), "b's text, then its end: " + string.Join(",", order));
                foreach (var id in new[] { a, b })
                {
                    Equal(24L, t.Done[id].CompletionTokens, id + ": completion_tokens");
                    Equal(t.Done[id].Text, t.Text(id), id + ": the one merged text vs done.text");
                }
                Equal(0, c.Poll(100), "events left");
                Equal(0, c.PendingRequests, "PendingRequests");
                NoBreach(t);
            }
        }

        static void LeaseStall()
        {
            var t = new Tracker();
            using (var c = NewClient(t))
            {
                int lease = c.Welcome.LeaseMs;
                string id = c.Generate(Long("The long night in Eldmoor", 200));
                PumpUntil(c, () => t.Text(id).Length > 0, 60, "the first text");
                int stall = lease * 3 / 2 + 500;
                Thread.Sleep(stall);        // the main thread stalls: no Poll, as in a scene load
                c.Stats();                  // answered only if the session is still there
                PumpUntil(c, () => t.Ended(id) && t.Stats.Count == 1, 60, "the request's end and the stats");
                Settle(c, 100);
                Check(t.Done.ContainsKey(id), "the request failed during the stall: " + (t.Failures.ContainsKey(id) ? string.Join(": ", t.Failures[id]) : ""));
                Equal("length", t.Done[id].FinishReason, "finish_reason");
                Equal(t.Done[id].Text, t.Text(id), "the streamed text vs done.text");
                Equal("True", string.Join(",", t.Connection), "ConnectionChanged events");
                Equal(0L, c.Reconnects, "reconnects");
                Check(t.Errors.Count == 0, "unexpected errors: " + Errs(t));
                NoBreach(t);
                Console.WriteLine("METRIC lease-stall lease_ms=" + lease + " stall_ms=" + stall);
            }
        }

        static void SessionDropped()
        {
            var t = new Tracker();
            var opts = new GllmClientOptions { ClientName = "unity-conformance/0.1", SendKeepalives = false };
            using (var c = NewClient(t, opts))
            {
                int lease = c.Welcome.LeaseMs;
                var ids = new List<string>();
                for (int i = 0; i < 4; i++) ids.Add(c.Generate(Long("A silent client number " + i, 240)));
                PumpUntil(c, () => ids.All(id => t.Text(id).Length > 0 || t.Ended(id)), 60, "the first texts");
                var sw = Stopwatch.StartNew();
                while (sw.ElapsedMilliseconds < lease + 1000) { c.Poll(5); Thread.Sleep(5); }   // silent past the lease
                string late = c.Generate(Long("Anyone still listening?", 8));   // answered with no_session
                ids.Add(late);
                PumpUntil(c, () => ids.All(t.Ended) && t.Connection.Count >= 3, 60, "the failures and the reconnect");
                Check(t.Failures.ContainsKey(late), "the request sent after the lease expired did not fail"
                      + (t.Done.ContainsKey(late) ? " (it completed: the server kept the silent session)" : ""));
                var failed = ids.Where(id => t.Failures.ContainsKey(id)).ToList();
                foreach (var id in failed)
                {
                    Equal("disconnected", t.Failures[id][0], id + "'s code");
                    Check(t.Failures[id][1].Contains("session"), id + "'s message does not say why: " + t.Failures[id][1]);
                }
                foreach (var id in ids.Where(x => t.Done.ContainsKey(x)))   // only those that finished before the drop
                {
                    Equal("length", t.Done[id].FinishReason, id + ": finish_reason");
                    Equal(t.Done[id].Text, t.Text(id), id + ": streamed vs done");
                }
                Equal("True,False,True", string.Join(",", t.Connection), "ConnectionChanged events");
                Check(c.Reconnects >= 1, "no reconnect");
                Equal(0, c.InFlight, "InFlight after the drop");
                string after = c.Generate(Long("Back again", 8));
                PumpUntil(c, () => t.Ended(after), 60, "a request after the reconnect");
                Check(t.Done.ContainsKey(after), "the request after the reconnect failed: " + (t.Failures.ContainsKey(after) ? string.Join(": ", t.Failures[after]) : ""));
                NoBreach(t);
                Console.WriteLine("METRIC session-dropped failed=" + failed.Count + " completed=" + (ids.Count - failed.Count));
            }
        }

        static void ServerRestart(MsgMap sc)
        {
            var r = sc.GetList("reference").Cast<MsgMap>().Single();
            var t = new Tracker();
            var opts = new GllmClientOptions { ClientName = "unity-conformance/0.1", ReconnectMinMs = 100, ReconnectMaxMs = 1000 };
            using (var c = NewClient(t, opts))
            {
                var ids = new List<string>();
                for (int i = 0; i < 3; i++) ids.Add(c.Generate(Long("Before the restart, story " + i, 240)));
                PumpUntil(c, () => ids.All(id => t.Text(id).Length > 0 || t.Ended(id)), 60, "the first texts");
                Check(!ids.Any(t.Ended), "a request ended before the restart");
                Console.WriteLine("@@ restart-server");
                Console.Out.Flush();
                string reply = Console.In.ReadLine();   // the main thread blocks meanwhile: the I/O thread goes on
                Check(reply != null && reply.Trim() == "@@ restarted", "the harness did not restart the server: " + reply);
                PumpUntil(c, () => ids.All(t.Ended) && t.Connection.Count >= 3, 90, "the failures and the reconnect");
                foreach (var id in ids)
                {
                    Check(t.Failures.ContainsKey(id), id + " did not fail");
                    Equal("disconnected", t.Failures[id][0], id + "'s code");
                }
                Equal("True,False,True", string.Join(",", t.Connection), "ConnectionChanged events");
                var o = OptionsFrom(r);
                c.Generate(o);
                PumpUntil(c, () => t.Ended(o.Id), 60, "a request after the restart");
                CompareWithReference(t, r);
                NoBreach(t);
                Console.WriteLine("METRIC server-restart reconnects=" + c.Reconnects);
            }
        }

        // ------------------------------------------------------------------------------ NPC memory, idle, structured
        static long StatsValue(GllmClient c, Tracker t, string key)
        {
            int n = t.Stats.Count;
            c.Stats();
            PumpUntil(c, () => t.Stats.Count > n, 30, "the stats");
            long? v = t.Stats[t.Stats.Count - 1].GetLong(key);
            Check(v.HasValue, "stats carries no " + key + ": " + Json.Serialize(t.Stats[t.Stats.Count - 1]));
            return v.Value;
        }

        static void IdleWindow()
        {
            var t = new Tracker();
            using (var c = NewClient(t))
            {
                long before = StatsValue(c, t, "window_reports");
                for (int i = 0; i < 3; i++) c.ReportIdle(4.0);
                c.ReportIdle(-1.0);
                c.ReportIdle(double.NaN);
                Equal(before + 3, StatsValue(c, t, "window_reports"), "window_reports after 3 ReportIdle (and 2 invalid)");
                long steps = StatsValue(c, t, "window_steps");
                string id = c.Generate(Long("In the idle windows the engine", 8));
                var sw = Stopwatch.StartNew();
                while (!t.Ended(id))
                {
                    if (sw.Elapsed.TotalSeconds > 60) throw new CheckFailed("timed out waiting for the generate inside idle windows");
                    Thread.Sleep(4);              // the frame's work
                    c.Poll(1);
                    c.ReportIdle(12.0);           // the rest of the 16 ms frame is the engine's
                    Thread.Sleep(12);
                }
                Check(t.Done.ContainsKey(id), "the generate inside idle windows did not complete: " + (t.Failures.ContainsKey(id) ? string.Join(": ", t.Failures[id]) : ""));
                Equal(8L, t.Done[id].CompletionTokens, "completion_tokens inside idle windows");
                long after = StatsValue(c, t, "window_steps");
                Check(after > steps, "window_steps did not grow (" + steps + " -> " + after + "): the engine did not step in the windows");
                NoBreach(t);
            }
        }

        static void StructuredOutput(MsgMap sc)
        {
            var refs = sc.GetList("reference").Cast<MsgMap>().ToList();
            var t = new Tracker();
            using (var c = NewClient(t))
            {
                foreach (var r in refs) c.Generate(OptionsFrom(r));
                string badSchema = c.Generate(new GenerateOptions { Prompt = "x", MaxTokens = 4, JsonSchema = "{not json" });
                string twoAtOnce = c.Generate(new GenerateOptions { Prompt = "x", MaxTokens = 4, Regex = "[0-9]", Choice = new List<string> { "a" } });
                PumpUntil(c, () => refs.All(r => t.Ended(r.GetString("id"))) && t.Ended(badSchema) && t.Ended(twoAtOnce), 120, "the structured requests");
                foreach (var r in refs)
                {
                    string id = r.GetString("id");
                    Check(t.Done.ContainsKey(id), id + " failed: " + (t.Failures.ContainsKey(id) ? string.Join(": ", t.Failures[id]) : ""));
                    var d = t.Done[id];
                    Equal("stop", d.FinishReason, id + ": finish_reason");
                    Equal(d.Text, t.Text(id), id + ": the streamed text vs done.text");
                    Equal(r.GetString("expected_text"), d.Text, id + ": the text vs the Python client's");
                    if (r.GetString("json_schema") != null)
                    {
                        var obj = Json.Parse(d.Text) as MsgMap;
                        Check(obj != null, id + ": the text is not a JSON object: " + d.Text);
                        Check(new[] { "open_gate", "wait" }.Contains(obj.GetString("action")), id + ": action " + Json.Serialize(obj["action"]));
                        Check(new[] { "calm", "angry" }.Contains(obj.GetString("mood")), id + ": mood " + Json.Serialize(obj["mood"]));
                    }
                    else if (r.GetList("choice") != null)
                        Check(r.GetList("choice").Cast<string>().Contains(d.Text), id + ": " + Json.Serialize(d.Text) + " is not one of the choices");
                    else
                        Check(d.Text.Length == 5 && char.IsDigit(d.Text[0]) && char.IsDigit(d.Text[1]) && d.Text[2] == '-'
                              && char.IsDigit(d.Text[3]) && char.IsDigit(d.Text[4]), id + ": " + Json.Serialize(d.Text) + " does not match the regex");
                }
                Check(t.Failures.ContainsKey(badSchema), "the malformed json_schema did not fail");
                Equal("bad_request", t.Failures[badSchema][0], "the malformed json_schema's code");
                Check(t.Failures[badSchema][1].Contains("json_schema"), "the message does not name json_schema: " + t.Failures[badSchema][1]);
                Check(t.Failures.ContainsKey(twoAtOnce), "regex with choice did not fail");
                Equal("bad_request", t.Failures[twoAtOnce][0], "regex with choice: the code");
                Check(t.Failures[twoAtOnce][1].Contains("regex") && t.Failures[twoAtOnce][1].Contains("choice"),
                      "the message does not name regex and choice: " + t.Failures[twoAtOnce][1]);
                string ok = c.Generate(Long("Still serving", 4));
                PumpUntil(c, () => t.Ended(ok), 60, "a request after the errors");
                Check(t.Done.ContainsKey(ok), "the request after the errors did not complete");
                NoBreach(t);
            }
        }

        const string PinnedPrompt = "The river spirits guard the old stone bridge of Eldmoor, and every traveller who "
            + "crosses it after dark leaves a copper coin on the parapet for them.";

        static void PinUnpin(MsgMap sc)
        {
            var lore = sc.GetList("lore").Cast<MsgMap>().Select(m => new ChatMessage(m.GetString("role"), m.GetString("content"))).ToList();
            var t = new Tracker();
            using (var c = NewClient(t))
            {
                string p1 = c.Pin(lore);
                PumpUntil(c, () => t.Ended(p1), 60, "the pin");
                var pin = t.Answer<PinInfo>(p1);
                Check(pin.Pin.StartsWith("pin-", StringComparison.Ordinal) && pin.Tokens > 0, "Pinned " + pin.Pin + " of " + pin.Tokens + " tokens");
                Equal(1L, StatsValue(c, t, "pins"), "stats pins after Pin");
                Check(StatsValue(c, t, "pinned_blocks") > 0, "stats pinned_blocks is 0 after Pin");
                string p2 = c.Pin(lore);
                PumpUntil(c, () => t.Ended(p2), 60, "the second pin");
                Equal(pin.Pin, t.Answer<PinInfo>(p2).Pin, "the same lore's pin name");
                string u1 = c.Unpin(pin.Pin);
                string u2 = c.Unpin(pin.Pin);
                PumpUntil(c, () => t.Ended(u1) && t.Ended(u2), 60, "the unpins");
                var first = t.Answer<UnpinInfo>(u1);
                Check(first.Found && first.Pin == pin.Pin, "the first Unpin: found " + first.Found + ", pin " + first.Pin);
                Check(!t.Answer<UnpinInfo>(u2).Found, "the second Unpin found the pin");
                Equal(0L, StatsValue(c, t, "pins"), "stats pins after Unpin");
                var many = Enumerable.Range(1000, ServerInt("max_seq_len") + 44).ToList();
                string big = c.PinTokens(many);
                string pp = c.PinPrompt(PinnedPrompt);
                PumpUntil(c, () => t.Ended(big) && t.Ended(pp), 60, "PinTokens and PinPrompt");
                Check(t.Failures.ContainsKey(big), "a pin longer than max_seq_len did not fail");
                Equal("too_long", t.Failures[big][0], "the long pin's code");
                var prompt = t.Answer<PinInfo>(pp);
                Check(prompt.Tokens > 0 && prompt.Pin != pin.Pin, "PinPrompt: " + prompt.Pin + " of " + prompt.Tokens + " tokens");
                string u3 = c.Unpin(prompt.Pin);
                PumpUntil(c, () => t.Ended(u3), 60, "the prompt's unpin");
                Check(t.Answer<UnpinInfo>(u3).Found, "the prompt's pin was not found");
                Equal(0L, StatsValue(c, t, "pins"), "stats pins at the end");
                Equal(0, c.InFlight, "InFlight after every op ended");
                NoBreach(t);
            }
        }

        static void EmbedScenario(MsgMap sc)
        {
            var er = sc.GetMap("embed_reference");
            var input = er.GetList("input").Cast<string>().ToList();
            var expected = er.GetList("expected_vectors").Cast<List<object>>().ToList();
            Check(input.Count == 3 && input[0] == input[2] && input[0] != input[1], "the scenario's input is not [a, b, a]");
            var t = new Tracker();
            using (var c = NewClient(t))
            {
                string e1 = c.Embed(input);
                string e2 = c.Embed(new[] { input[1] });
                string bad = c.Embed(new[] { "" });
                PumpUntil(c, () => t.Ended(e1) && t.Ended(e2) && t.Ended(bad), 60, "the embeddings");
                var got = t.Answer<EmbeddingsInfo>(e1);
                Equal(3, got.Vectors.Length, "vectors for 3 inputs");
                Check(got.PromptTokens > 0, "prompt_tokens " + got.PromptTokens);
                for (int i = 0; i < 3; i++)
                {
                    Equal(expected[i].Count, got.Vectors[i].Length, "the dimension of vector " + i);
                    double norm = 0;
                    for (int j = 0; j < got.Vectors[i].Length; j++)
                    {
                        double want = MsgValue.AsDouble(expected[i][j]).Value;
                        Check(Math.Abs(want - got.Vectors[i][j]) < 1e-6, "vector " + i + "[" + j + "] is " + got.Vectors[i][j] + ", the Python client got " + want);
                        norm += (double)got.Vectors[i][j] * got.Vectors[i][j];
                    }
                    Check(Math.Abs(Math.Sqrt(norm) - 1) < 1e-5, "vector " + i + " has norm " + Math.Sqrt(norm));
                }
                Check(got.Vectors[0].SequenceEqual(got.Vectors[2]), "identical texts gave different vectors");
                Check(!got.Vectors[0].SequenceEqual(got.Vectors[1]), "different texts gave the same vector");
                var alone = t.Answer<EmbeddingsInfo>(e2);
                Check(alone.Vectors.Length == 1 && alone.Vectors[0].SequenceEqual(got.Vectors[1]), "the second text alone gave another vector");
                Check(t.Failures.ContainsKey(bad), "an empty input did not fail");
                Equal("bad_request", t.Failures[bad][0], "the empty input's code");
                Check(t.Failures[bad][1].Contains("input"), "the message does not name input: " + t.Failures[bad][1]);
                NoBreach(t);
            }
        }

        static void SnapshotRestore(MsgMap sc)
        {
            var refs = sc.GetList("reference").Cast<MsgMap>().ToList();
            MsgMap r1 = refs[0], r2 = refs[1];
            var t = new Tracker();
            var opts = new GllmClientOptions { ClientName = "unity-conformance/0.1", ReconnectMinMs = 100, ReconnectMaxMs = 1000 };
            using (var c = NewClient(t, opts))
            {
                var o1 = OptionsFrom(r1);
                c.Generate(o1);
                PumpUntil(c, () => t.Ended(o1.Id), 60, "the conversation");
                CompareWithReference(t, r1);
                string s = c.Snapshot(o1.Id, "int8");
                PumpUntil(c, () => t.Ended(s), 60, "the snapshot");
                var snap = t.Answer<SnapshotInfo>(s);
                var done = t.Done[o1.Id];
                Check(snap.Blob != null && snap.Blob.Length > 0, "the snapshot blob is empty");
                Check(snap.Tokens > 0 && snap.Tokens <= done.PromptTokens + done.CompletionTokens,
                      "the snapshot holds " + snap.Tokens + " tokens of a " + (done.PromptTokens + done.CompletionTokens) + "-token conversation");
                Console.WriteLine("@@ restart-server");
                Console.Out.Flush();
                string reply = Console.In.ReadLine();
                Check(reply != null && reply.Trim() == "@@ restarted", "the harness did not restart the server: " + reply);
                PumpUntil(c, () => t.Connection.Count >= 3, 90, "the reconnect");
                Equal("True,False,True", string.Join(",", t.Connection), "ConnectionChanged events");
                var damaged = (byte[])snap.Blob.Clone();
                damaged[damaged.Length / 2] ^= 0x01;
                string bad = c.Restore(damaged);
                PumpUntil(c, () => t.Ended(bad), 60, "the damaged restore");
                Check(t.Failures.ContainsKey(bad), "a damaged blob was restored");
                Equal("bad_request", t.Failures[bad][0], "the damaged blob's code");
                Check(t.Failures[bad][1].Length > 0, "the damaged blob's error has no message");
                string rs = c.Restore(snap.Blob);
                PumpUntil(c, () => t.Ended(rs), 60, "the restore");
                var restored = t.Answer<RestoreInfo>(rs);
                Equal(snap.Tokens, restored.Tokens, "the restored tokens");
                Check(restored.NewBlocks > 0, "the restore added no KV blocks to the fresh server");
                var o2 = OptionsFrom(r2);
                c.Generate(o2);
                PumpUntil(c, () => t.Ended(o2.Id), 60, "the continuation");
                CompareWithReference(t, r2);
                Check(t.Done[o2.Id].CachedTokens >= restored.Tokens,
                      "the continuation reports " + t.Done[o2.Id].CachedTokens + " cached tokens; " + restored.Tokens + " were restored");
                Equal(0, c.InFlight, "InFlight after every op ended");
                NoBreach(t);
            }
        }

        static void PollCost()
        {
            var t = new Tracker();
            using (var c = NewClient(t))
            {
                const double frameMs = 1000.0 / 60;
                var idle = RunFrames(c, 120, frameMs, null);
                var ids = new List<string>();
                bool replace = true;
                int serial = 0;
                t.OnCompleted = (id, done) =>
                {
                    if (replace) ids.Add(c.Generate(Long("Stream " + (serial++) + " of the market crowd", 48)));
                };
                for (int i = 0; i < 16; i++) ids.Add(c.Generate(Long("Stream " + (serial++) + " of the market crowd", 48)));
                PumpUntil(c, () => ids.Any(id => t.Text(id).Length > 0), 60, "the first text");
                List<double> busyWithEvents;
                var busy = RunFrames(c, 150, frameMs, null, out busyWithEvents);
                replace = false;
                foreach (var id in ids.ToList()) if (!t.Ended(id)) c.Cancel(id);
                PumpUntil(c, () => ids.All(t.Ended), 120, "every stream's end");
                Settle(c, 200);
                foreach (var id in ids)
                {
                    Check(t.Done.ContainsKey(id), id + " failed: " + (t.Failures.ContainsKey(id) ? string.Join(": ", t.Failures[id]) : ""));
                    Equal(t.Done[id].Text, t.Text(id), id + ": the streamed text vs done.text");
                }
                NoBreach(t);
                int completed = ids.Count(id => t.Done[id].FinishReason == "length");
                Console.WriteLine("METRIC poll-cost idle_median_ms=" + F(Pct(idle, 50)) + " idle_p99_ms=" + F(Pct(idle, 99))
                                  + " idle_max_ms=" + F(idle.Max()) + " streams16_median_ms=" + F(Pct(busy, 50))
                                  + " streams16_p99_ms=" + F(Pct(busy, 99)) + " streams16_max_ms=" + F(busy.Max())
                                  + " frames_idle=" + idle.Count + " frames_streams16=" + busy.Count
                                  + " frames_with_events=" + busyWithEvents.Count
                                  + (busyWithEvents.Count > 0 ? " with_events_median_ms=" + F(Pct(busyWithEvents, 50))
                                     + " with_events_p99_ms=" + F(Pct(busyWithEvents, 99)) : "")
                                  + " streams_completed=" + completed + " streams_total=" + ids.Count);
            }
        }

        static List<double> RunFrames(GllmClient c, int frames, double frameMs, Action perFrame)
        {
            List<double> withEvents;
            return RunFrames(c, frames, frameMs, perFrame, out withEvents);
        }

        /// <summary>A 60-fps loop: Poll(2 ms) each frame, then sleep to the next frame. Returns every frame's Poll
        /// cost; withEvents gets those of the frames whose Poll dispatched something.</summary>
        static List<double> RunFrames(GllmClient c, int frames, double frameMs, Action perFrame, out List<double> withEvents)
        {
            var costs = new List<double>(frames);
            withEvents = new List<double>();
            var clock = Stopwatch.StartNew();
            double next = 0;
            for (int f = 0; f < frames; f++)
            {
                long t0 = Stopwatch.GetTimestamp();
                int n = c.Poll(2.0);
                long t1 = Stopwatch.GetTimestamp();
                double ms = (t1 - t0) * 1000.0 / Stopwatch.Frequency;
                costs.Add(ms);
                if (n > 0) withEvents.Add(ms);
                if (perFrame != null) perFrame();
                next += frameMs;
                double sleep = next - clock.Elapsed.TotalMilliseconds;
                if (sleep > 0) Thread.Sleep((int)sleep);
            }
            return costs;
        }

        static double Pct(List<double> xs, double p)
        {
            var s = xs.OrderBy(x => x).ToList();
            int i = (int)Math.Ceiling(p / 100.0 * s.Count) - 1;
            return s[Math.Max(0, Math.Min(s.Count - 1, i))];
        }

        static void Shutdown()
        {
            var t = new Tracker();
            var c = NewClient(t);
            var ids = new List<string> { c.Generate(Long("Closing time, story one", 200)), c.Generate(Long("Closing time, story two", 200)) };
            PumpUntil(c, () => ids.All(id => t.Text(id).Length > 0), 60, "the first texts");
            var sw = Stopwatch.StartNew();
            c.Close();
            double closeMs = sw.Elapsed.TotalMilliseconds;
            Check(closeMs < 5000, "Close took " + closeMs + " ms");
            PumpUntil(c, () => ids.All(t.Ended), 10, "the requests' ends after Close");
            Settle(c, 100);
            foreach (var id in ids)
            {
                Check(t.Failures.ContainsKey(id), id + " did not fail after Close");
                Equal("disconnected", t.Failures[id][0], id + "'s code");
            }
            Equal(ConnectionState.Closed, c.State, "the state after Close");
            Equal(0, c.InFlight, "InFlight after Close");
            NoBreach(t);

            // Nothing listening: the request fails with disconnected; Close is clean.
            var listener = new TcpListener(IPAddress.Loopback, 0);
            listener.Start();
            int freePort = ((IPEndPoint)listener.LocalEndpoint).Port;
            listener.Stop();
            var t2 = new Tracker();
            var c2 = new GllmClient();
            t2.Attach(c2);
            c2.Connect("127.0.0.1", freePort, new GllmClientOptions { ReconnectMinMs = 100 });
            string lonely = c2.Generate(Long("Is anyone there?", 4));
            PumpUntil(c2, () => t2.Ended(lonely), 30, "the request to nowhere");
            Check(t2.Failures.ContainsKey(lonely), "the request to nowhere did not fail");
            Equal("disconnected", t2.Failures[lonely][0], "its code");
            Check(!c2.IsConnected, "connected to nothing");
            Check(c2.LastError != null, "no LastError");
            sw.Restart();
            c2.Close();
            double close2 = sw.Elapsed.TotalMilliseconds;
            Check(close2 < 5000, "Close took " + close2 + " ms");
            NoBreach(t2);
            Console.WriteLine("METRIC shutdown close_ms=" + F(closeMs) + " close_unconnected_ms=" + F(close2)
                              + " refused_reason=\"" + t2.Failures[lonely][1].Replace('"', '\'') + "\"");
        }
    }
}
