// The game-facing client of the gllm bridge (bindings/PROTOCOL.md): a background I/O thread owns the TCP socket
// (ZMTP handshake, lease pings, PING -> PONG, reconnect with back-off), and the game drains events on its own
// thread with Poll(budgetMs), once per frame. Every request ends with exactly one Completed or Failed.
using System;
using System.Collections.Concurrent;
using System.Collections.Generic;
using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using System.Text;
using System.Threading;

namespace Gllm
{
    public enum ConnectionState
    {
        /// <summary>Not started, or closed.</summary>
        Idle,
        /// <summary>TCP connect, ZMTP handshake, hello sent, no welcome yet.</summary>
        Connecting,
        /// <summary>Welcomed: requests go out at once.</summary>
        Connected,
        /// <summary>Lost the connection (or never had it); waiting to try again.</summary>
        Reconnecting,
        Closed,
    }

    public sealed class GllmClientOptions
    {
        /// <summary>Sent in hello (logs only).</summary>
        public string ClientName = "unity/0.1";
        /// <summary>The server's shared secret, when it requires one (--token).</summary>
        public string Token;
        public int ConnectTimeoutMs = 3000;
        /// <summary>From TCP connect to welcome.</summary>
        public int HandshakeTimeoutMs = 5000;
        public bool AutoReconnect = true;
        /// <summary>Back-off between connection attempts: doubles from Min to Max, plus up to 25 % jitter.</summary>
        public int ReconnectMinMs = 200;
        public int ReconnectMaxMs = 5000;
        /// <summary>ReportFrame sends one frame report per interval: the smoothed frame time, and the longest
        /// frame, the frame count and the count over 1.1 x target since the previous report.</summary>
        public int FrameReportIntervalMs = 250;
        /// <summary>Weight of the newest frame in the smoothed frame time ReportFrame sends.</summary>
        public double FrameSmoothing = 0.2;
        /// <summary>Lease pings (every lease_ms / 3 when nothing else was sent). Turn off only to test the
        /// server dropping a silent session.</summary>
        public bool SendKeepalives = true;
        /// <summary>Longest Close() waits for the I/O thread before closing the socket under it.</summary>
        public int ShutdownWaitMs = 200;
        /// <summary>Diagnostics, called on the I/O thread.</summary>
        public Action<string> Log;
    }

    /// <summary>A client of the gllm bridge. Call its methods and Poll from one thread (the game's main thread):
    /// the I/O thread never runs your code, Poll does. Single use: Connect once, Close once.</summary>
    public sealed class GllmClient : IDisposable
    {
        public const string DisconnectedCode = "disconnected";

        // ---------------------------------------------------------------------------------- events (Poll's thread)
        /// <summary>(id, delta, fullSoFar): new text of a request, coalesced per request per Poll.</summary>
        public event Action<string, string, string> TextReceived;
        /// <summary>(id, done): the request ended normally ("stop", "length", "cancelled" or "error" in the engine).</summary>
        public event Action<string, DoneInfo> Completed;
        /// <summary>(id, code, message): the request ended without a done: a server error code (bad_request,
        /// too_long, busy, ...) or "disconnected" when the connection or session was lost.</summary>
        public event Action<string, string, string> Failed;
        /// <summary>True once welcomed, false when a welcomed session is lost.</summary>
        public event Action<bool> ConnectionChanged;
        /// <summary>(id or null, code, message): server errors that end no request (duplicate_id, unknown_op,
        /// unauthorized, ...).</summary>
        public event Action<string, string, string> ErrorReceived;
        /// <summary>The answer to Stats(): every counter the server sent.</summary>
        public event Action<MsgMap> StatsReceived;
        /// <summary>The round trip of a Ping(), in milliseconds.</summary>
        public event Action<double> PongReceived;
        /// <summary>(id, entries): per-token log-probabilities, for requests that asked for them.</summary>
        public event Action<string, List<object>> LogprobsReceived;
        /// <summary>(id, snapshot): the answer to Snapshot/SnapshotTokens: the blob for the save game.</summary>
        public event Action<string, SnapshotInfo> SnapshotReceived;
        /// <summary>(id, info): the answer to Restore: the blob's KV is in the server's prefix cache.</summary>
        public event Action<string, RestoreInfo> Restored;
        /// <summary>(id, info): the answer to Pin/PinPrompt/PinTokens: the pin's name and its resident tokens.</summary>
        public event Action<string, PinInfo> Pinned;
        /// <summary>(id, info): the answer to Unpin: whether the server had the pin.</summary>
        public event Action<string, UnpinInfo> Unpinned;
        /// <summary>(id, info): the answer to Embed: one unit-length vector per input, in order.</summary>
        public event Action<string, EmbeddingsInfo> EmbeddingsReceived;

        // ---------------------------------------------------------------------------------- shared state
        enum EvKind { Text, Completed, Failed, Connection, Error, Stats, Pong, Reply }

        sealed class Ev
        {
            public EvKind Kind;
            public string Id, Text, Code, Message;
            public DoneInfo Done;
            public bool Flag;
            public MsgMap Map;
            public double Value;
            public List<object> Logprobs;
            public object Reply;              // an NPC-memory op's answer: SnapshotInfo, RestoreInfo, PinInfo, ...
        }

        enum CmdKind { Request, Cancel, Send }   // Request: a generate or an NPC-memory op (one end each)

        sealed class Cmd
        {
            public CmdKind Kind;
            public string Id;
            public byte[] Payload;
            public bool Generate;   // a generate (ends with done/error), not another request (ends with its reply)
        }

        sealed class Conn
        {
            public Socket Sock;
            public SocketAsyncEventArgs Rx;
            public volatile bool RxDone;
            public bool RxPending;
            public ZmtpReader Reader = new ZmtpReader();
            public bool GotReady;
            public ByteBuffer Parts;          // message frames with MORE set, joined
        }

        readonly ConcurrentQueue<Ev> _events = new ConcurrentQueue<Ev>();
        readonly ConcurrentQueue<Cmd> _commands = new ConcurrentQueue<Cmd>();
        readonly AutoResetEvent _wake = new AutoResetEvent(false);
        GllmClientOptions _opt;
        string _host;
        int _port;
        Thread _thread;
        volatile bool _stop;
        volatile int _state = (int)ConnectionState.Idle;
        volatile WelcomeInfo _welcome;
        volatile string _lastError;
        volatile Conn _conn;
        long _reconnects;
        int _live;

        // ---------------------------------------------------------------------------------- I/O thread state
        readonly HashSet<string> _inflight = new HashSet<string>();
        readonly HashSet<string> _generating = new HashSet<string>();   // the generates among _inflight: another op's reply never ends them
        readonly List<Cmd> _waiting = new List<Cmd>();
        readonly ByteBuffer _sendBuf = new ByteBuffer(4096);
        long _lastSendTicks, _deadlineTicks, _nextAttemptTicks;
        int _backoffMs;
        readonly Random _jitter = new Random();

        // ---------------------------------------------------------------------------------- main-thread state
        readonly Dictionary<string, StringBuilder> _open = new Dictionary<string, StringBuilder>();
        readonly List<Ev> _carry = new List<Ev>();
        readonly Dictionary<string, Ev> _pendingText = new Dictionary<string, Ev>();
        int _carryPos;
        long _nextId;
        double _frameEma = -1;
        long _lastFrameSentTicks;
        double _frameMax;
        long _frameCount, _frameOver, _frameReports;
        FrameReport _lastFrameReport;

        public ConnectionState State { get { return (ConnectionState)_state; } }
        /// <summary>Whether the session is up, as the I/O thread sees it now (it may run ahead of the
        /// ConnectionChanged events that Poll has not dispatched yet).</summary>
        public bool IsConnected { get { return _state == (int)ConnectionState.Connected; } }
        /// <summary>The current session's welcome (model, max_seq_len, lease_ms, max_inflight, ...); null before one.</summary>
        public WelcomeInfo Welcome { get { return _welcome; } }
        /// <summary>Why the last connection attempt or session ended.</summary>
        public string LastError { get { return _lastError; } }
        /// <summary>How many times a connection attempt was started after the first.</summary>
        public long Reconnects { get { return Interlocked.Read(ref _reconnects); } }
        /// <summary>Requests started with Generate (and NPC-memory ops: Snapshot, Restore, Pin, Unpin, Embed) that
        /// have not ended as the I/O thread sees it (sent or waiting for the session, no reply yet). When it is 0,
        /// every end is queued for Poll.</summary>
        public int InFlight { get { return Volatile.Read(ref _live); } }
        /// <summary>Requests started with Generate whose Completed/Failed has not been dispatched yet.</summary>
        public int PendingRequests { get { return _open.Count; } }
        /// <summary>The last frame report ReportFrame sent (for a HUD or a test); default before the first.</summary>
        public FrameReport LastFrameReport { get { return _lastFrameReport; } }
        /// <summary>How many frame reports ReportFrame has sent (queued for the I/O thread).</summary>
        public long FrameReports { get { return _frameReports; } }
        public string Host { get { return _host; } }
        public int Port { get { return _port; } }

        static long Now() { return Stopwatch.GetTimestamp(); }
        static long MsToTicks(double ms) { return (long)(ms * Stopwatch.Frequency / 1000.0); }
        static double TicksToMs(long ticks) { return ticks * 1000.0 / Stopwatch.Frequency; }

        // ---------------------------------------------------------------------------------- API
        /// <summary>Starts the I/O thread, which connects (and reconnects) on its own. Returns at once; requests
        /// made before the welcome wait for it (and fail with "disconnected" if the attempt fails).</summary>
        public void Connect(string host = "127.0.0.1", int port = 5555, GllmClientOptions options = null)
        {
            if (_thread != null) throw new InvalidOperationException("Connect was already called on this client");
            if (string.IsNullOrEmpty(host)) throw new ArgumentException("host");
            _host = host;
            _port = port;
            _opt = options ?? new GllmClientOptions();
            _state = (int)ConnectionState.Connecting;
            _thread = new Thread(IoMain) { IsBackground = true, Name = "gllm-client-io" };
            _thread.Start();
        }

        /// <summary>Starts a request; returns its id at once. Its text arrives as TextReceived events, and it ends
        /// with exactly one Completed or Failed (dispatched by Poll).</summary>
        public string Generate(GenerateOptions options)
        {
            if (options == null) throw new ArgumentNullException("options");
            if ((options.Prompt == null) == (options.Messages == null))
                throw new ArgumentException("give exactly one of Prompt and Messages");
            RequireStarted();
            string id = options.Id ?? ("g" + (++_nextId).ToString(System.Globalization.CultureInfo.InvariantCulture));
            if (!_open.ContainsKey(id)) _open[id] = new StringBuilder();
            Interlocked.Increment(ref _live);
            Enqueue(new Cmd { Kind = CmdKind.Request, Id = id, Payload = Messages.Generate(id, options), Generate = true });
            return id;
        }

        /// <summary>Asks the server to end a request; it then ends with Completed (finish_reason "cancelled", or
        /// whatever it reached first). An id not in flight is ignored.</summary>
        public void Cancel(string id)
        {
            if (id == null) return;
            RequireStarted();
            Enqueue(new Cmd { Kind = CmdKind.Cancel, Id = id, Payload = Messages.Cancel(id) });
        }

        /// <summary>Prefills a chat (typically the shared system prompt and lore) into the server's prefix cache
        /// with a one-token greedy request; it ends like any request. Returns its id.</summary>
        public string Warmup(IList<ChatMessage> messages, int priority = -1)
        {
            if (messages == null || messages.Count == 0) throw new ArgumentException("messages");
            return Generate(new GenerateOptions
            {
                Messages = new List<ChatMessage>(messages), MaxTokens = 1, Temperature = 0.0, Priority = priority,
            });
        }

        /// <summary>The frame time the server assumes when a report gives no target (60 fps).</summary>
        public const double DefaultTargetMs = 1000.0 / 60.0;
        /// <summary>A frame longer than this many times the target counts as over (one a player may notice).</summary>
        public const double OverFactor = 1.1;
        const double MaxFrameMs = 1e9;

        /// <summary>The game's last frame time and its target (0: 60 fps), once per frame. Keeps a smoothed frame
        /// time (FrameSmoothing), the longest frame, the frame count and the count of frames over 1.1 x target;
        /// every FrameReportIntervalMs it sends one frame report with them and starts the counts again. The first
        /// call sends at once. Reports made while not connected are dropped (their counts too).</summary>
        public void ReportFrame(double ms, double targetMs)
        {
            if (_thread == null || double.IsNaN(ms) || ms < 0) return;
            if (double.IsNaN(targetMs) || targetMs < 0) targetMs = 0;
            ms = Math.Min(ms, MaxFrameMs);                      // the protocol's limit (§5: 0 - 10^9)
            targetMs = Math.Min(targetMs, MaxFrameMs);
            double a = _opt.FrameSmoothing;
            _frameEma = _frameEma < 0 ? ms : _frameEma + a * (ms - _frameEma);
            if (_frameCount == 0 || ms > _frameMax) _frameMax = ms;
            _frameCount++;
            if (ms > OverFactor * (targetMs > 0 ? targetMs : DefaultTargetMs)) _frameOver++;
            long now = Now();
            if (_lastFrameSentTicks != 0 && now - _lastFrameSentTicks < MsToTicks(_opt.FrameReportIntervalMs)) return;
            _lastFrameSentTicks = now;
            var report = new FrameReport
            {
                Ms = _frameEma, TargetMs = targetMs, MaxMs = _frameMax, Frames = _frameCount, Over = _frameOver,
            };
            _frameMax = 0;
            _frameCount = 0;
            _frameOver = 0;
            _lastFrameReport = report;
            _frameReports++;
            Enqueue(new Cmd { Kind = CmdKind.Send, Payload = report.ToMessage() });
        }

        /// <summary>Asks for the engine's counters; the answer comes as StatsReceived (dropped while not
        /// connected, like Ping and ReportFrame).</summary>
        public void Stats()
        {
            RequireStarted();
            Enqueue(new Cmd { Kind = CmdKind.Send, Payload = Messages.StatsRequest() });
        }

        /// <summary>Measures the round trip; the answer comes as PongReceived. (Lease pings are automatic.)</summary>
        public void Ping()
        {
            RequireStarted();
            long t = Now();
            Enqueue(new Cmd { Kind = CmdKind.Send, Payload = Messages.Ping(t) });
        }

        /// <summary>The game will not need the device (the GPU or CPU it shares with the engine) for the next ms
        /// milliseconds: call it at the end of each frame's work, if the game knows its frame's phases; the engine
        /// then steps only inside such windows (PROTOCOL.md §5.1 idle). Not answered; dropped while not connected
        /// (like ReportFrame); a negative or NaN ms sends nothing.</summary>
        public void ReportIdle(double ms)
        {
            if (_thread == null || double.IsNaN(ms) || ms < 0) return;
            Enqueue(new Cmd { Kind = CmdKind.Send, Payload = Messages.Idle(Math.Min(ms, MaxFrameMs)) });
        }

        // ---------------------------------------------------------------------------------- NPC memory (§5.3)
        // Each op returns its id at once and ends exactly once, like a generate: with its answer event
        // (SnapshotReceived, Restored, Pinned, Unpinned, EmbeddingsReceived) or with Failed(id, code, message):
        // a server code (bad_request, too_long, busy) or "disconnected". Ops made while not connected wait for the
        // session, as generates do. Keep their ids distinct from generate ids in flight (null: the client picks).

        /// <summary>Exports the KV cache of a conversation (the id of one of this client's generates that has
        /// ended) for the save game; the blob comes as SnapshotReceived. encoding: null ("raw") or "int8" (about
        /// half the size). A snapshot over the server's max_message_bytes fails with too_long.</summary>
        public string Snapshot(string conversation, string encoding = null, string id = null)
        {
            if (string.IsNullOrEmpty(conversation)) throw new ArgumentException("conversation");
            return StartOp(id, opId => Messages.Snapshot(opId, conversation, null, encoding));
        }

        /// <summary>Exports the KV cache of token ids (1 to 2^20 of them), as Snapshot does.</summary>
        public string SnapshotTokens(IList<int> tokens, string encoding = null, string id = null)
        {
            if (tokens == null || tokens.Count == 0) throw new ArgumentException("tokens");
            var copy = new List<int>(tokens);
            return StartOp(id, opId => Messages.Snapshot(opId, null, copy, encoding));
        }

        /// <summary>Loads a snapshot blob back into the server's prefix cache (answered by Restored): the next
        /// generate whose prompt starts with its tokens skips their prefill. A blob of another model, or changed in
        /// any byte, fails with bad_request; one larger than the free KV, with too_long.</summary>
        public string Restore(byte[] blob, string id = null)
        {
            if (blob == null || blob.Length == 0) throw new ArgumentException("blob");
            var copy = (byte[])blob.Clone();
            return StartOp(id, opId => Messages.Restore(opId, copy));
        }

        /// <summary>Keeps the KV of chat messages (rendered without a generation prompt: typically the shared
        /// system prompt and lore) resident on the server, never evicted, until Unpin; answered by Pinned.</summary>
        public string Pin(IList<ChatMessage> messages, string id = null)
        {
            if (messages == null || messages.Count == 0) throw new ArgumentException("messages");
            var copy = new List<ChatMessage>(messages);
            return StartOp(id, opId => Messages.Pin(opId, null, copy, null));
        }

        /// <summary>Pin of a raw prompt (BOS added, as in a generate).</summary>
        public string PinPrompt(string prompt, string id = null)
        {
            if (string.IsNullOrEmpty(prompt)) throw new ArgumentException("prompt");
            return StartOp(id, opId => Messages.Pin(opId, prompt, null, null));
        }

        /// <summary>Pin of token ids.</summary>
        public string PinTokens(IList<int> tokens, string id = null)
        {
            if (tokens == null || tokens.Count == 0) throw new ArgumentException("tokens");
            var copy = new List<int>(tokens);
            return StartOp(id, opId => Messages.Pin(opId, null, null, copy));
        }

        /// <summary>Lets a pin's blocks be evicted again; answered by Unpinned (Found: whether the server had it).</summary>
        public string Unpin(string pin, string id = null)
        {
            if (string.IsNullOrEmpty(pin)) throw new ArgumentException("pin");
            return StartOp(id, opId => Messages.Unpin(opId, pin));
        }

        /// <summary>Embeddings of 1 to 256 non-empty texts, for lore retrieval; answered by EmbeddingsReceived with
        /// one unit-length vector per text, in order. pooling: null ("mean" over the tokens) or "last".</summary>
        public string Embed(IList<string> inputs, string pooling = null, string id = null)
        {
            if (inputs == null || inputs.Count == 0) throw new ArgumentException("inputs");
            var copy = new List<string>(inputs);
            return StartOp(id, opId => Messages.Embed(opId, copy, pooling));
        }

        string StartOp(string id, Func<string, byte[]> build)
        {
            RequireStarted();
            string opId = id ?? ("m" + (++_nextId).ToString(System.Globalization.CultureInfo.InvariantCulture));
            byte[] payload = build(opId);
            Interlocked.Increment(ref _live);
            Enqueue(new Cmd { Kind = CmdKind.Request, Id = opId, Payload = payload });
            return opId;
        }

        /// <summary>Dispatches queued events on the calling thread until budgetMs is spent (at least one event when
        /// any is waiting; the rest wait for the next call). Text of one request is merged into one event.
        /// Returns how many events were dispatched.</summary>
        public int Poll(double budgetMs)
        {
            long start = Now();
            Ev ev;
            while (_events.TryDequeue(out ev)) Stage(ev);
            if (_carryPos >= _carry.Count) return 0;
            long budget = MsToTicks(Math.Max(0, budgetMs));
            int n = 0;
            while (_carryPos < _carry.Count)
            {
                if (n > 0 && Now() - start >= budget) break;
                Ev e = _carry[_carryPos];
                _carry[_carryPos++] = null;
                if (_carryPos == _carry.Count) { _carry.Clear(); _carryPos = 0; }
                n++;
                Dispatch(e);
            }
            return n;
        }

        /// <summary>Stops the I/O thread (waiting at most ShutdownWaitMs) and closes the connection. Requests in
        /// flight end with Failed "disconnected" if Poll is called afterwards.</summary>
        public void Close()
        {
            if (_thread == null || _stop) { _state = (int)ConnectionState.Closed; return; }
            _stop = true;
            _wake.Set();
            if (!_thread.Join(Math.Max(0, _opt.ShutdownWaitMs)))
            {
                var c = _conn;      // unblock a connect or send in progress; the thread then ends on its own
                if (c != null) SafeClose(c.Sock);
            }
            _state = (int)ConnectionState.Closed;
        }

        public void Dispose() { Close(); }

        // ---------------------------------------------------------------------------------- main-thread helpers
        void RequireStarted()
        {
            if (_thread == null) throw new InvalidOperationException("call Connect first");
        }

        void Enqueue(Cmd c)
        {
            _commands.Enqueue(c);
            _wake.Set();
        }

        void Stage(Ev ev)
        {
            if (ev.Kind == EvKind.Text)
            {
                Ev pending;
                if (_pendingText.TryGetValue(ev.Id, out pending))
                {
                    pending.Text += ev.Text;
                    if (ev.Logprobs != null)
                    {
                        if (pending.Logprobs == null) pending.Logprobs = ev.Logprobs;
                        else pending.Logprobs.AddRange(ev.Logprobs);
                    }
                    return;
                }
                _pendingText[ev.Id] = ev;
            }
            else if (ev.Id != null && (ev.Kind == EvKind.Completed || ev.Kind == EvKind.Failed))
            {
                _pendingText.Remove(ev.Id);   // text after this end (an id reused at once) starts a new event
            }
            _carry.Add(ev);
        }

        void Dispatch(Ev e)
        {
            switch (e.Kind)
            {
                case EvKind.Text:
                {
                    Ev staged;
                    if (_pendingText.TryGetValue(e.Id, out staged) && staged == e) _pendingText.Remove(e.Id);
                    StringBuilder sb;
                    if (!_open.TryGetValue(e.Id, out sb)) return;     // ended already (cannot happen in order)
                    if (e.Logprobs != null && LogprobsReceived != null) LogprobsReceived(e.Id, e.Logprobs);
                    if (e.Text.Length == 0) return;
                    sb.Append(e.Text);
                    var h = TextReceived;
                    if (h != null) h(e.Id, e.Text, sb.ToString());
                    return;
                }
                case EvKind.Completed:
                {
                    _open.Remove(e.Id);
                    var h = Completed;
                    if (h != null) h(e.Id, e.Done);
                    return;
                }
                case EvKind.Failed:
                {
                    _open.Remove(e.Id);
                    var h = Failed;
                    if (h != null) h(e.Id, e.Code, e.Message);
                    return;
                }
                case EvKind.Connection:
                {
                    var h = ConnectionChanged;
                    if (h != null) h(e.Flag);
                    return;
                }
                case EvKind.Error:
                {
                    var h = ErrorReceived;
                    if (h != null) h(e.Id, e.Code, e.Message);
                    return;
                }
                case EvKind.Stats:
                {
                    var h = StatsReceived;
                    if (h != null) h(e.Map);
                    return;
                }
                case EvKind.Pong:
                {
                    var h = PongReceived;
                    if (h != null) h(e.Value);
                    return;
                }
                case EvKind.Reply:
                    DispatchReply(e.Id, e.Reply);
                    return;
            }
        }

        void DispatchReply(string id, object reply)
        {
            if (reply is SnapshotInfo) { var h = SnapshotReceived; if (h != null) h(id, (SnapshotInfo)reply); }
            else if (reply is RestoreInfo) { var h = Restored; if (h != null) h(id, (RestoreInfo)reply); }
            else if (reply is PinInfo) { var h = Pinned; if (h != null) h(id, (PinInfo)reply); }
            else if (reply is UnpinInfo) { var h = Unpinned; if (h != null) h(id, (UnpinInfo)reply); }
            else if (reply is EmbeddingsInfo) { var h = EmbeddingsReceived; if (h != null) h(id, (EmbeddingsInfo)reply); }
        }

        // ---------------------------------------------------------------------------------- I/O thread
        void Emit(Ev e) { _events.Enqueue(e); }

        /// <summary>A request's Completed or Failed: queued for Poll, and no longer counted in InFlight.</summary>
        void EmitEnd(Ev e)
        {
            _events.Enqueue(e);
            Interlocked.Decrement(ref _live);
        }

        void Log(string text)
        {
            var log = _opt.Log;
            if (log == null) return;
            try { log(text); } catch (Exception) { }
        }

        void IoMain()
        {
            try
            {
                _nextAttemptTicks = Now();
                _backoffMs = _opt.ReconnectMinMs;
                bool first = true;
                while (!_stop)
                {
                    if (_conn == null)
                    {
                        long wait = _nextAttemptTicks - Now();
                        if (wait > 0 || !(first || _opt.AutoReconnect))
                        {
                            DrainCommandsWhileDown();   // requests made while no attempt is under way fail now
                            _wake.WaitOne(wait > 0 ? (int)Math.Min(250, TicksToMs(wait) + 1) : 250);
                            continue;
                        }
                        if (!first) Interlocked.Increment(ref _reconnects);
                        first = false;
                        Open();
                        continue;
                    }
                    Conn c = _conn;
                    try
                    {
                        Service(c);
                    }
                    catch (Exception ex)
                    {
                        if (_stop) break;
                        Lost(Describe(ex), false);
                        continue;
                    }
                    if (_conn != c || _stop) continue;
                    _wake.WaitOne(NextWaitMs());
                }
            }
            catch (Exception ex)
            {
                Log("gllm client I/O thread failed: " + ex);
            }
            finally
            {
                var c = _conn;
                _conn = null;
                if (c != null) SafeClose(c.Sock);
                FailAll("the client was closed");
                DrainCommandsWhileDown();
                if (_state == (int)ConnectionState.Connected) Emit(new Ev { Kind = EvKind.Connection, Flag = false });
                _state = (int)ConnectionState.Closed;
            }
        }

        static string Describe(Exception ex)
        {
            var se = ex as SocketException;
            if (se != null) return "socket error: " + se.SocketErrorCode + " (" + se.Message + ")";
            if (ex is ZmtpException || ex is MsgPackException) return "protocol error: " + ex.Message;
            return ex.GetType().Name + ": " + ex.Message;
        }

        int NextWaitMs()
        {
            long now = Now();
            long next = now + MsToTicks(250);
            if (_state == (int)ConnectionState.Connecting) next = Math.Min(next, _deadlineTicks);
            else if (_state == (int)ConnectionState.Connected && _opt.SendKeepalives)
                next = Math.Min(next, _lastSendTicks + MsToTicks(KeepaliveMs()));
            return (int)Math.Max(0, Math.Min(250, TicksToMs(next - now) + 1));
        }

        int KeepaliveMs()
        {
            var w = _welcome;
            return Math.Max(10, (w != null ? w.LeaseMs : 5000) / 3);
        }

        /// <summary>TCP connect, then greeting + READY in one write; the rest of the handshake comes in Service.</summary>
        void Open()
        {
            _state = (int)ConnectionState.Connecting;
            Socket sock = null;
            try
            {
                IPAddress addr = Resolve(_host);
                sock = new Socket(addr.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
                sock.NoDelay = true;
                var c = new Conn { Sock = sock };
                _conn = c;   // Close() can reach the socket from here on
                IAsyncResult ar = sock.BeginConnect(new IPEndPoint(addr, _port), null, null);
                long deadline = Now() + MsToTicks(_opt.ConnectTimeoutMs);
                var handles = new WaitHandle[] { ar.AsyncWaitHandle, _wake };
                while (!ar.IsCompleted)
                {
                    if (_stop) { SafeClose(sock); return; }
                    long left = deadline - Now();
                    if (left <= 0) throw new TimeoutException("connect timed out after " + _opt.ConnectTimeoutMs + " ms");
                    if (WaitHandle.WaitAny(handles, (int)Math.Min(250, TicksToMs(left) + 1)) == 1)
                    {
                        DrainCommandsWhileConnecting();
                    }
                }
                sock.EndConnect(ar);
                sock.SendTimeout = 10000;
                c.Rx = new SocketAsyncEventArgs { UserToken = c };
                c.Rx.SetBuffer(new byte[64 * 1024], 0, 64 * 1024);
                c.Rx.Completed += OnRxCompleted;
                _deadlineTicks = Now() + MsToTicks(_opt.HandshakeTimeoutMs);
                SendRaw(c, Zmtp.ClientOpening());
            }
            catch (Exception ex)
            {
                if (_stop) return;
                Lost("cannot connect to " + _host + ":" + _port + ": " + Describe(ex), false);
            }
        }

        static IPAddress Resolve(string host)
        {
            IPAddress ip;
            if (IPAddress.TryParse(host, out ip)) return ip;
            if (string.Equals(host, "localhost", StringComparison.OrdinalIgnoreCase)) return IPAddress.Loopback;
            var all = Dns.GetHostAddresses(host);
            foreach (var a in all) if (a.AddressFamily == AddressFamily.InterNetwork) return a;
            if (all.Length > 0) return all[0];
            throw new SocketException((int)SocketError.HostNotFound);
        }

        void OnRxCompleted(object sender, SocketAsyncEventArgs args)
        {
            var c = (Conn)args.UserToken;
            c.RxDone = true;
            _wake.Set();
        }

        /// <summary>One round of the connected loop: received bytes, commands, keepalive, timeouts.</summary>
        void Service(Conn c)
        {
            for (int guard = 0; guard < 64; guard++)
            {
                if (!c.RxPending)
                {
                    c.RxPending = true;
                    c.RxDone = false;
                    if (c.Sock.ReceiveAsync(c.Rx)) break;       // pending: the callback wakes us
                    c.RxDone = true;                             // completed at once
                }
                if (!c.RxDone) break;
                c.RxPending = false;
                c.RxDone = false;
                if (c.Rx.SocketError != SocketError.Success)
                    throw new SocketException((int)c.Rx.SocketError);
                if (c.Rx.BytesTransferred == 0)
                {
                    Lost("the server closed the connection", false);
                    return;
                }
                c.Reader.Feed(c.Rx.Buffer, 0, c.Rx.BytesTransferred);
                ReadFrames(c);
                if (_conn != c) return;
            }
            ProcessCommands(c);
            if (_conn != c) return;
            long now = Now();
            if (_state == (int)ConnectionState.Connecting && now > _deadlineTicks)
            {
                Lost("no welcome within " + _opt.HandshakeTimeoutMs + " ms", false);
                return;
            }
            if (_state == (int)ConnectionState.Connected && _opt.SendKeepalives
                && now - _lastSendTicks >= MsToTicks(KeepaliveMs()))
                SendMessage(c, Messages.Ping(null));
        }

        void ReadFrames(Conn c)
        {
            byte flags; byte[] body; int off, len;
            while (_conn == c && c.Reader.TryFrame(out flags, out body, out off, out len))
            {
                if ((flags & Zmtp.FlagCommand) != 0)
                {
                    OnCommand(c, body, off, len);
                    continue;
                }
                if (!c.GotReady) throw new ZmtpException("a message arrived before the server's READY");
                if ((flags & Zmtp.FlagMore) != 0)
                {
                    if (c.Parts == null) c.Parts = new ByteBuffer(len * 2);
                    c.Parts.Add(body, off, len);
                    continue;
                }
                if (c.Parts != null && c.Parts.Length > 0)
                {
                    c.Parts.Add(body, off, len);
                    body = c.Parts.ToArray(); off = 0; len = body.Length;
                    c.Parts.Clear();
                }
                MsgMap msg = null;
                try { msg = MsgPackReader.Decode(body, off, len) as MsgMap; }
                catch (MsgPackException ex) { Log("ignoring an undecodable message: " + ex.Message); }
                if (msg != null) OnMessage(c, msg);
            }
        }

        void OnCommand(Conn c, byte[] body, int off, int len)
        {
            int data;
            string name = Zmtp.CommandName(body, off, len, out data);
            int end = off + len;
            if (name == "READY")
            {
                if (c.GotReady) return;
                var props = Zmtp.ParseProperties(body, data, end);
                byte[] type;
                if (props.TryGetValue("Socket-Type", out type) && Encoding.ASCII.GetString(type) != "ROUTER")
                    throw new ZmtpException("the server's socket is a " + Encoding.ASCII.GetString(type) + ", not a ROUTER");
                c.GotReady = true;
                SendMessage(c, Messages.Hello(_opt.ClientName, _opt.Token));
            }
            else if (name == "ERROR")
            {
                string reason = end - data >= 1 ? Encoding.ASCII.GetString(body, data + 1, Math.Min(body[data], end - data - 1)) : "";
                throw new ZmtpException("the server refused the connection: " + reason);
            }
            else if (name == "PING")
            {
                if (!c.GotReady) return;
                int ctx = data + 2;                      // 2-byte TTL, then up to 16 bytes of context
                int ctxLen = Math.Max(0, Math.Min(16, end - ctx));
                SendRaw(c, Zmtp.Pong(body, Math.Min(ctx, end), ctxLen));
            }
            // PONG and unknown commands: ignored
        }

        void OnMessage(Conn c, MsgMap m)
        {
            string op = m.GetString("op");
            switch (op)
            {
                case "welcome":
                {
                    var w = WelcomeInfo.FromMessage(m);
                    if (w.Version != Messages.ProtocolVersion)
                    {
                        Lost("the server speaks protocol v" + w.Version + "; this client speaks v1", false);
                        return;
                    }
                    _welcome = w;
                    if (_state == (int)ConnectionState.Connected) return;   // a repeated welcome
                    _state = (int)ConnectionState.Connected;
                    _backoffMs = _opt.ReconnectMinMs;
                    _lastError = null;
                    Emit(new Ev { Kind = EvKind.Connection, Flag = true });
                    var waiting = _waiting.ToArray();
                    _waiting.Clear();
                    foreach (var cmd in waiting)
                    {
                        if (_conn != c) { _waiting.Add(cmd); continue; }
                        SendGenerate(c, cmd);
                    }
                    return;
                }
                case "tokens":
                {
                    var items = m.GetList("items");
                    if (items == null) return;
                    foreach (var o in items)
                    {
                        var it = o as MsgMap;
                        if (it == null) continue;
                        string id = it.GetString("id");
                        if (id == null || !_inflight.Contains(id)) continue;
                        string text = it.GetString("text") ?? "";
                        var lps = it.GetList("logprobs");
                        if (text.Length == 0 && lps == null) continue;
                        Emit(new Ev { Kind = EvKind.Text, Id = id, Text = text, Logprobs = lps });
                    }
                    return;
                }
                case "done":
                {
                    string id = m.GetString("id");
                    if (id != null && _inflight.Remove(id))
                    {
                        _generating.Remove(id);
                        EmitEnd(new Ev { Kind = EvKind.Completed, Id = id, Done = DoneInfo.FromMessage(m) });
                    }
                    return;
                }
                case "error":
                {
                    string id = m.GetString("id");
                    string code = m.GetString("code") ?? "bad_request";
                    string message = m.GetString("message") ?? "";
                    if (code == "no_session")
                    {
                        // The server dropped this session (lease, backlog): everything in flight is gone.
                        Lost("the server ended the session: " + message, true);
                        return;
                    }
                    if (id != null && code != "duplicate_id" && _inflight.Remove(id))
                    {
                        _generating.Remove(id);
                        EmitEnd(new Ev { Kind = EvKind.Failed, Id = id, Code = code, Message = message });
                        return;
                    }
                    Emit(new Ev { Kind = EvKind.Error, Id = id, Code = code, Message = message });
                    if (_state == (int)ConnectionState.Connecting && id == null)
                        Lost("the server refused the session: " + code + ": " + message, false);   // hello refused
                    return;
                }
                case "pong":
                {
                    object t = m["t"];
                    if (t is long) Emit(new Ev { Kind = EvKind.Pong, Value = TicksToMs(Now() - (long)t) });
                    return;
                }
                case "stats":
                    Emit(new Ev { Kind = EvKind.Stats, Map = m });
                    return;
                case "snapshot":
                case "restored":
                case "pinned":
                case "unpinned":
                case "embeddings":
                {
                    string id = m.GetString("id");
                    if (id == null || _generating.Contains(id) || !_inflight.Remove(id)) return;   // a generate ends with done/error
                    object reply;
                    if (op == "snapshot")
                    {
                        var snap = SnapshotInfo.FromMessage(m);
                        if (snap.Blob == null)
                        {
                            EmitEnd(new Ev { Kind = EvKind.Failed, Id = id, Code = "bad_request", Message = "the snapshot reply carries no bin blob" });
                            return;
                        }
                        reply = snap;
                    }
                    else if (op == "restored") reply = RestoreInfo.FromMessage(m);
                    else if (op == "pinned") reply = PinInfo.FromMessage(m);
                    else if (op == "unpinned") reply = UnpinInfo.FromMessage(m);
                    else reply = EmbeddingsInfo.FromMessage(m);
                    EmitEnd(new Ev { Kind = EvKind.Reply, Id = id, Reply = reply });
                    return;
                }
            }
            // unknown ops: ignored (§4.3)
        }

        void ProcessCommands(Conn c)
        {
            Cmd cmd;
            while (_conn == c && _commands.TryDequeue(out cmd))
            {
                bool ready = _state == (int)ConnectionState.Connected;
                switch (cmd.Kind)
                {
                    case CmdKind.Request:
                        if (ready) SendGenerate(c, cmd);
                        else _waiting.Add(cmd);
                        break;
                    case CmdKind.Cancel:
                        if (CancelWaiting(cmd.Id)) break;
                        if (ready && _inflight.Contains(cmd.Id)) SendMessage(c, cmd.Payload);
                        break;
                    case CmdKind.Send:
                        if (ready) SendMessage(c, cmd.Payload);
                        break;
                }
            }
        }

        void DrainCommandsWhileConnecting()
        {
            Cmd cmd;
            while (_commands.TryDequeue(out cmd))
            {
                if (cmd.Kind == CmdKind.Request) _waiting.Add(cmd);
                else if (cmd.Kind == CmdKind.Cancel) CancelWaiting(cmd.Id);
            }
        }

        void DrainCommandsWhileDown()
        {
            Cmd cmd;
            while (_commands.TryDequeue(out cmd))
            {
                if (cmd.Kind != CmdKind.Request) continue;
                string why = _stop ? "the client was closed" : "not connected to the gllm server at " + _host + ":" + _port
                             + (_lastError != null ? " (" + _lastError + ")" : "");
                EmitEnd(new Ev { Kind = EvKind.Failed, Id = cmd.Id, Code = DisconnectedCode, Message = why });
            }
        }

        bool CancelWaiting(string id)
        {
            for (int i = 0; i < _waiting.Count; i++)
                if (_waiting[i].Id == id)
                {
                    _waiting.RemoveAt(i);
                    EmitEnd(new Ev { Kind = EvKind.Completed, Id = id, Done = new DoneInfo { Id = id, FinishReason = "cancelled", Text = "" } });
                    return true;
                }
            return false;
        }

        void SendGenerate(Conn c, Cmd cmd)
        {
            var w = _welcome;
            if (w != null && cmd.Payload.Length > w.MaxMessageBytes)
            {
                if (!_inflight.Contains(cmd.Id))
                    EmitEnd(new Ev { Kind = EvKind.Failed, Id = cmd.Id, Code = "too_long",
                                  Message = "the request is " + cmd.Payload.Length + " bytes; the server accepts at most " + w.MaxMessageBytes });
                else
                    Interlocked.Decrement(ref _live);
                return;
            }
            if (!_inflight.Add(cmd.Id)) Interlocked.Decrement(ref _live);   // a duplicate: the server answers
            else if (cmd.Generate) _generating.Add(cmd.Id);                   // duplicate_id; it has no end of its own
            SendMessage(c, cmd.Payload);
        }

        void SendMessage(Conn c, byte[] payload)
        {
            _sendBuf.Clear();
            Zmtp.WriteHeader(_sendBuf, 0, payload.Length);
            _sendBuf.Add(payload);
            SendBytes(c, _sendBuf.Data, _sendBuf.Length);
            _lastSendTicks = Now();
        }

        void SendRaw(Conn c, byte[] bytes) { SendBytes(c, bytes, bytes.Length); }

        static void SendBytes(Conn c, byte[] data, int count)
        {
            int sent = 0;
            while (sent < count)
            {
                int n = c.Sock.Send(data, sent, count - sent, SocketFlags.None);
                if (n <= 0) throw new SocketException((int)SocketError.ConnectionReset);
                sent += n;
            }
        }

        /// <summary>The connection or session is gone: close it, end every request in flight with one Failed
        /// "disconnected", and schedule the next attempt (at once after a dropped session, else with back-off).</summary>
        void Lost(string why, bool retryNow)
        {
            var c = _conn;
            _conn = null;
            if (c != null) SafeClose(c.Sock);
            bool wasConnected = _state == (int)ConnectionState.Connected;
            _lastError = why;
            Log("gllm: " + why);
            FailAll(why);
            if (wasConnected) Emit(new Ev { Kind = EvKind.Connection, Flag = false });
            _state = (int)ConnectionState.Reconnecting;
            int delay = retryNow ? 0 : _backoffMs + _jitter.Next(0, _backoffMs / 4 + 1);
            if (!retryNow) _backoffMs = Math.Min(_opt.ReconnectMaxMs, Math.Max(1, _backoffMs * 2));
            _nextAttemptTicks = Now() + MsToTicks(delay);
            if (!_opt.AutoReconnect && !_stop) _state = (int)ConnectionState.Idle;
        }

        void FailAll(string why)
        {
            foreach (var id in _inflight)
                EmitEnd(new Ev { Kind = EvKind.Failed, Id = id, Code = DisconnectedCode, Message = why });
            _inflight.Clear();
            _generating.Clear();
            foreach (var cmd in _waiting)
                EmitEnd(new Ev { Kind = EvKind.Failed, Id = cmd.Id, Code = DisconnectedCode, Message = why });
            _waiting.Clear();
        }

        static void SafeClose(Socket s)
        {
            if (s == null) return;
            try { s.Close(); } catch (Exception) { }
        }
    }
}
