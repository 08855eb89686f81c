// The scene's connection to a gllm server: owns one GllmClient, drains its events in Update within a per-frame
// budget, and stops it (never blocking more than ~200 ms) on disable, on quit and before a script reload.
using System;
using System.Diagnostics;
using UnityEngine;
using Gllm;

namespace Gllm.Unity
{
    [DisallowMultipleComponent]
    [DefaultExecutionOrder(-100)]
    [AddComponentMenu("gllm/Gllm Bridge")]
    public sealed class GllmBridge : MonoBehaviour
    {
        [Header("Server (gllm serve --zmq tcp://HOST:PORT)")]
        [SerializeField] string host = "127.0.0.1";
        [SerializeField] int port = 5555;
        [Tooltip("The server's --token, when it requires one (non-loopback servers).")]
        [SerializeField] string token = "";

        [Header("Per frame")]
        [Tooltip("Most milliseconds Update spends dispatching events (at least one event per frame is dispatched).")]
        [SerializeField] float pollBudgetMs = 1.0f;
        [SerializeField] bool dontDestroyOnLoad = true;
        [SerializeField] bool logConnection = true;

        /// <summary>The first enabled bridge (what GllmNpc and GllmFrameReporter use when none is set).</summary>
        public static GllmBridge Instance { get; private set; }

        /// <summary>The client; null while disabled. Subscribe to its events or use GllmNpc.</summary>
        public GllmClient Client { get; private set; }

        /// <summary>Fired on the main thread when a new client starts (after enable).</summary>
        public event Action<GllmClient> ClientStarted;

        /// <summary>What the last Update's Poll cost, in milliseconds.</summary>
        public float LastPollMs { get; private set; }
        /// <summary>Events the last Update dispatched.</summary>
        public int LastPollEvents { get; private set; }

        public string Host { get { return host; } set { host = value; } }
        public int Port { get { return port; } set { port = value; } }

        void OnEnable()
        {
            if (Instance == null) Instance = this;
            if (dontDestroyOnLoad && transform.parent == null) DontDestroyOnLoad(gameObject);
            var options = new GllmClientOptions
            {
                ClientName = "unity/0.1 (" + Application.unityVersion + ")",
                Token = string.IsNullOrEmpty(token) ? null : token,
            };
            Client = new GllmClient();
            if (logConnection) Client.ConnectionChanged += LogConnection;
            Client.Connect(host, port, options);
            Application.quitting += StopClient;
#if UNITY_EDITOR
            UnityEditor.AssemblyReloadEvents.beforeAssemblyReload += StopClient;
#endif
            var started = ClientStarted;
            if (started != null) started(Client);
        }

        void Update()
        {
            var c = Client;
            if (c == null) return;
            long t0 = Stopwatch.GetTimestamp();
            LastPollEvents = c.Poll(pollBudgetMs);
            LastPollMs = (float)((Stopwatch.GetTimestamp() - t0) * 1000.0 / Stopwatch.Frequency);
        }

        void OnDisable()
        {
            StopClient();
            if (Instance == this) Instance = null;
        }

        void StopClient()
        {
            Application.quitting -= StopClient;
#if UNITY_EDITOR
            UnityEditor.AssemblyReloadEvents.beforeAssemblyReload -= StopClient;
#endif
            var c = Client;
            if (c == null) return;
            Client = null;
            c.Close();
            c.Poll(0);   // deliver the Failed("disconnected") of requests still in flight
        }

        void LogConnection(bool up)
        {
            var c = Client;
            if (up) UnityEngine.Debug.Log("gllm: connected to " + host + ":" + port + " (model " + (c != null && c.Welcome != null ? c.Welcome.Model : "?") + ")");
            else UnityEngine.Debug.LogWarning("gllm: disconnected from " + host + ":" + port + ": " + (c != null ? c.LastError : ""));
        }
    }
}
