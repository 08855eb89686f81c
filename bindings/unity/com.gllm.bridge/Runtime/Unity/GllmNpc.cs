// One talking character: a persona, a conversation (NpcConversation) and UnityEvents for its streamed reply.
using System;
using UnityEngine;
using UnityEngine.Events;
using Gllm;

namespace Gllm.Unity
{
    [Serializable] public class GllmTextEvent : UnityEvent<string> { }
    [Serializable] public class GllmFailedEvent : UnityEvent<string, string> { }

    [AddComponentMenu("gllm/Gllm Npc")]
    public sealed class GllmNpc : MonoBehaviour
    {
        [Tooltip("Leave empty to use GllmBridge.Instance.")]
        [SerializeField] GllmBridge bridge;
        [TextArea(3, 10)]
        [SerializeField] string persona = "You are a helpful villager.";
        [Tooltip("Higher is scheduled first and preempted last (the NPC the player faces).")]
        public int priority;
        [Range(1, 1024)] public int maxTokens = 96;
        [Range(0f, 2f)] public float temperature = 0.7f;
        [Tooltip("Pace the reply to at most this many tokens a second (15-40: about as fast as it is read or spoken), "
                 + "leaving the engine's time to the other NPCs; 0: as fast as possible.")]
        [Range(0f, 100f)] public float maxTokensPerS;
        [Tooltip("The first words are wanted within this many ms (among NPCs of equal priority, the earliest deadline "
                 + "goes first); 0: no deadline.")]
        [Min(0f)] public float ttftDeadlineMs;

        [Header("Events (main thread)")]
        [Tooltip("The reply so far, each time more of it arrives.")]
        public GllmTextEvent onText = new GllmTextEvent();
        [Tooltip("The whole reply once the request ends with a done (finish reason stop, length or cancelled).")]
        public GllmTextEvent onCompleted = new GllmTextEvent();
        [Tooltip("(code, message): the reply failed: \"disconnected\" (server not running or restarted), too_long, busy, ...")]
        public GllmFailedEvent onFailed = new GllmFailedEvent();

        NpcConversation _conversation;

        public NpcConversation Conversation
        {
            get
            {
                if (_conversation == null) Use(new NpcConversation(name, persona));
                return _conversation;
            }
        }

        public string Persona
        {
            get { return persona; }
            set { persona = value; Conversation.SystemPrompt = value; }
        }

        public bool IsSpeaking { get { return _conversation != null && _conversation.ActiveRequestId != null; } }

        public GllmBridge Bridge
        {
            get { return bridge != null ? bridge : GllmBridge.Instance; }
            set { bridge = value; }
        }

        /// <summary>The player says a line; the reply streams into onText. Returns the request id, or null when
        /// no bridge is running.</summary>
        public string Say(string line)
        {
            var b = Bridge;
            var c = b != null ? b.Client : null;
            if (c == null)
            {
                onFailed.Invoke(GllmClient.DisconnectedCode, "no GllmBridge is enabled in the scene");
                return null;
            }
            var conv = Conversation;
            conv.SystemPrompt = persona;
            conv.Settings.MaxTokens = maxTokens;
            conv.Settings.Temperature = temperature;
            conv.Settings.MaxTokensPerS = maxTokensPerS > 0 ? maxTokensPerS : (double?)null;
            conv.Settings.TtftDeadlineMs = ttftDeadlineMs > 0 ? ttftDeadlineMs : (double?)null;
            return conv.Say(c, line, priority);
        }

        /// <summary>Stops the reply in flight (walking away, closing the dialogue).</summary>
        public void Cancel()
        {
            if (_conversation != null) _conversation.Cancel();
        }

        public string SaveJson() { return Conversation.ToJson(); }

        public void LoadJson(string json)
        {
            var loaded = NpcConversation.FromJson(json);
            persona = loaded.SystemPrompt;
            Use(loaded);
        }

        void Use(NpcConversation conv)
        {
            if (_conversation != null)
            {
                _conversation.Cancel();
                _conversation.Detach();
                _conversation.ReplyUpdated -= OnText;
                _conversation.ReplyCompleted -= OnCompleted;
                _conversation.ReplyFailed -= OnFailed;
            }
            _conversation = conv;
            conv.ReplyUpdated += OnText;
            conv.ReplyCompleted += OnCompleted;
            conv.ReplyFailed += OnFailed;
        }

        void OnText(string full) { onText.Invoke(full); }
        void OnCompleted(DoneInfo done) { onCompleted.Invoke(done.Text); }
        void OnFailed(string code, string message) { onFailed.Invoke(code, message); }

        void OnDisable()
        {
            Cancel();
            if (_conversation != null) _conversation.Detach();
        }
    }
}
