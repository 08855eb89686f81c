// The NpcDialogue sample: one bootstrap object builds the whole scene in code. Three NPCs (guard, merchant, bard)
// answer when the player (WASD / arrows) walks up to them, their replies streaming into speech bubbles. The NPC
// the player faces gets a higher priority; walking away cancels its reply; E asks the faced NPC another question.
// The HUD shows the frame time p99 and the client's per-frame cost; a panel says how to start the server when it
// is not running.
using System.Collections.Generic;
using System.Text;
using UnityEngine;
using Gllm;
using Gllm.Unity;

namespace Gllm.Samples.NpcDialogue
{
    [AddComponentMenu("gllm/Samples/Npc Dialogue Bootstrap")]
    public sealed class NpcDialogueBootstrap : MonoBehaviour
    {
        public string host = "127.0.0.1";
        public int port = 5555;
        public float talkRadius = 4f;
        public float moveSpeed = 5f;
        [Tooltip("Priority of the NPC the player faces; the others get 0.")]
        public int facedPriority = 10;

        const string Lore =
            "The town of Eldmoor sits on a cold river under Duke Aldric's grey keep. The north road has been closed "
            + "since the dragon woke in the hills; the old stone bridge is said to be guarded by river spirits. "
            + "Answer in one or two short sentences, in character.";

        sealed class Npc
        {
            public GllmNpc Agent;
            public Transform Body;
            public TextMesh Bubble;
            public string[] Lines;
            public int NextLine;
            public bool Engaged;
        }

        readonly List<Npc> _npcs = new List<Npc>();
        GllmBridge _bridge;
        GllmFrameReporter _frames;
        Transform _player, _camera;
        readonly float[] _pollCosts = new float[300];
        int _pollCount, _pollNext;
        float _pollP99, _disconnectedFor;
        bool _warmedUp;

        void Start()
        {
            var light = new GameObject("Light").AddComponent<Light>();
            light.type = LightType.Directional;
            light.transform.rotation = Quaternion.Euler(50, -30, 0);
            var ground = GameObject.CreatePrimitive(PrimitiveType.Plane);
            ground.transform.localScale = new Vector3(4, 1, 4);
            _player = GameObject.CreatePrimitive(PrimitiveType.Capsule).transform;
            _player.name = "Player";
            _player.position = new Vector3(0, 1, -8);
            _camera = (Camera.main != null ? Camera.main : new GameObject("Camera").AddComponent<Camera>()).transform;

            // The bridge: configure it before it is enabled (it connects in OnEnable).
            var bridgeObject = new GameObject("gllm");
            bridgeObject.SetActive(false);
            _bridge = bridgeObject.AddComponent<GllmBridge>();
            _bridge.Host = host;
            _bridge.Port = port;
            _frames = bridgeObject.AddComponent<GllmFrameReporter>();
            bridgeObject.SetActive(true);

            AddNpc("Guard", new Vector3(-6, 1, 2), new Color(0.6f, 0.6f, 0.7f),
                   "You are Brann, a tired town guard of Eldmoor who has not slept since the dragon woke.",
                   new[] { "Halt? I'm just passing through.", "Is the north road really closed?", "Seen the dragon?" });
            AddNpc("Merchant", new Vector3(0, 1, 6), new Color(0.8f, 0.6f, 0.2f),
                   "You are Odila, a merchant of furs and salt who haggles over everything.",
                   new[] { "What do you sell?", "That's too expensive.", "Any news from the road?" });
            AddNpc("Bard", new Vector3(6, 1, 2), new Color(0.5f, 0.2f, 0.7f),
                   "You are Lira, a bard who sings of the old bridge and the river spirits.",
                   new[] { "Sing me something.", "Who were the river spirits?", "Tell me about the fallen king." });
        }

        void AddNpc(string npcName, Vector3 position, Color color, string role, string[] lines)
        {
            var body = GameObject.CreatePrimitive(PrimitiveType.Cylinder);
            body.name = npcName;
            body.transform.position = position;
            body.GetComponent<Renderer>().material.color = color;
            var bubble = new GameObject(npcName + " bubble").AddComponent<TextMesh>();
            bubble.transform.SetParent(body.transform, false);
            bubble.transform.localPosition = new Vector3(0, 1.6f, 0);
            bubble.characterSize = 0.08f;
            bubble.fontSize = 48;
            bubble.anchor = TextAnchor.LowerCenter;
            bubble.alignment = TextAlignment.Center;
            bubble.text = npcName;
            // A TextMesh added from code has no font: use the built-in one (renamed in Unity 2022.2).
#if UNITY_2022_2_OR_NEWER
            var font = Resources.GetBuiltinResource<Font>("LegacyRuntime.ttf");
#else
            var font = Resources.GetBuiltinResource<Font>("Arial.ttf");
#endif
            bubble.font = font;
            bubble.GetComponent<MeshRenderer>().material = font.material;

            var agent = body.AddComponent<GllmNpc>();
            agent.Bridge = _bridge;
            agent.Persona = Lore + "\n\n" + role;
            agent.maxTokens = 64;
            var npc = new Npc { Agent = agent, Body = body.transform, Bubble = bubble, Lines = lines };
            agent.onText.AddListener(text => npc.Bubble.text = Wrap(text, 32));
            agent.onFailed.AddListener((code, message) => npc.Bubble.text = code == GllmClient.DisconnectedCode ? "..." : "(" + code + ")");
            _npcs.Add(npc);
        }

        void Update()
        {
            // Player movement and the camera.
            var move = new Vector3(Input.GetAxis("Horizontal"), 0, Input.GetAxis("Vertical"));
            if (move.sqrMagnitude > 0.01f)
            {
                _player.position = _player.position + move * (moveSpeed * Time.deltaTime);
                _player.rotation = Quaternion.Slerp(_player.rotation, Quaternion.LookRotation(move), 10f * Time.deltaTime);
            }
            _camera.position = Vector3.Lerp(_camera.position, _player.position + new Vector3(0, 7, -9), 5f * Time.deltaTime);
            _camera.LookAt(_player.position);

            var client = _bridge.Client;
            bool connected = client != null && client.IsConnected;
            _disconnectedFor = connected ? 0 : _disconnectedFor + Time.unscaledDeltaTime;
            if (connected && !_warmedUp)
            {
                foreach (var n in _npcs) client.Warmup(new[] { ChatMessage.System(n.Agent.Persona) });   // the lore, prefilled once
                _warmedUp = true;
            }

            foreach (var npc in _npcs)
            {
                Vector3 toNpc = npc.Body.position - _player.position;
                bool near = toNpc.magnitude < talkRadius;
                bool facing = Vector3.Dot(_player.forward, toNpc.normalized) > 0.7f;
                if (near && (!npc.Engaged || (facing && Input.GetKeyDown(KeyCode.E))))
                {
                    npc.Engaged = true;
                    npc.Agent.priority = facing ? facedPriority : 0;
                    npc.Bubble.text = "...";
                    npc.Agent.Say(npc.Lines[npc.NextLine++ % npc.Lines.Length]);
                }
                else if (!near && npc.Engaged)
                {
                    npc.Engaged = false;
                    npc.Agent.Cancel();                     // walking away ends the reply
                    npc.Bubble.text = npc.Body.name;
                }
                npc.Bubble.transform.rotation = Quaternion.LookRotation(npc.Bubble.transform.position - _camera.position);
            }

            _pollCosts[_pollNext] = _bridge.LastPollMs;
            _pollNext = (_pollNext + 1) % _pollCosts.Length;
            if (_pollCount < _pollCosts.Length) _pollCount++;
            if (Time.frameCount % 30 == 0) _pollP99 = Percentile(_pollCosts, _pollCount, 0.99f);
        }

        void OnGUI()
        {
            var client = _bridge != null ? _bridge.Client : null;
            string state = client == null ? "stopped" : client.State.ToString();
            GUI.Box(new Rect(10, 10, 330, 90),
                    "frame p99: " + _frames.P99Ms.ToString("0.0") + " ms (last " + _frames.LastMs.ToString("0.0") + ")\n"
                    + "gllm Poll: " + _bridge.LastPollMs.ToString("0.000") + " ms, p99 " + _pollP99.ToString("0.000") + " ms\n"
                    + "server " + host + ":" + port + ": " + state
                    + (client != null && client.Welcome != null ? " (" + client.Welcome.Model + ")" : "") + "\n"
                    + "WASD to walk, E to ask the NPC you face");
            if (_disconnectedFor > 1.5f)
            {
                GUI.Box(new Rect(Screen.width / 2 - 260, Screen.height / 2 - 60, 520, 120),
                        "The gllm server is not running.\n\nStart it in a terminal with:\n\n"
                        + "gllm serve --zmq tcp://" + host + ":" + port + "\n\n"
                        + (client != null && client.LastError != null ? client.LastError : ""));
            }
        }

        static float Percentile(float[] values, int count, float p)
        {
            if (count == 0) return 0;
            var sorted = new float[count];
            System.Array.Copy(values, sorted, count);
            System.Array.Sort(sorted);
            return sorted[Mathf.Clamp(Mathf.CeilToInt(p * count) - 1, 0, count - 1)];
        }

        static string Wrap(string text, int width)
        {
            var sb = new StringBuilder();
            int col = 0;
            foreach (var word in text.Split(' '))
            {
                if (col > 0 && col + word.Length > width) { sb.Append('\n'); col = 0; }
                else if (col > 0) { sb.Append(' '); col++; }
                sb.Append(word);
                col += word.Length;
            }
            return sb.ToString();
        }
    }
}
