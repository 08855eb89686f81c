// Reports every frame's time to the server through GllmClient.ReportFrame (four reports a second: the smoothed
// frame time, the longest frame, the frame count and how many ran over 1.1 x target), so the engine's
// frame budget can keep inference out of the frame; also keeps recent frame times for a HUD.
using UnityEngine;
using Gllm;

namespace Gllm.Unity
{
    [AddComponentMenu("gllm/Gllm Frame Reporter")]
    public sealed class GllmFrameReporter : MonoBehaviour
    {
        [Tooltip("Leave empty to use GllmBridge.Instance.")]
        [SerializeField] GllmBridge bridge;
        [Tooltip("The frame time the game aims for, in ms; 0: from Application.targetFrameRate (else 60 fps).")]
        [SerializeField] float targetMs;

        readonly float[] _recent = new float[300];
        readonly float[] _sorted = new float[300];
        int _count, _next;

        /// <summary>The 99th percentile of the last 300 frame times, in ms.</summary>
        public float P99Ms { get; private set; }
        public float LastMs { get; private set; }

        public float TargetMs
        {
            get
            {
                if (targetMs > 0) return targetMs;
                int fps = Application.targetFrameRate;
                return fps > 0 ? 1000f / fps : 1000f / 60f;
            }
        }

        void Update()
        {
            float ms = Time.unscaledDeltaTime * 1000f;
            LastMs = ms;
            _recent[_next] = ms;
            _next = (_next + 1) % _recent.Length;
            if (_count < _recent.Length) _count++;
            if (Time.frameCount % 30 == 0) P99Ms = Percentile(0.99f);
            var b = bridge != null ? bridge : GllmBridge.Instance;
            var c = b != null ? b.Client : null;
            if (c != null) c.ReportFrame(ms, TargetMs);
        }

        float Percentile(float p)
        {
            if (_count == 0) return 0;
            System.Array.Copy(_recent, _sorted, _count);
            System.Array.Sort(_sorted, 0, _count);
            int i = Mathf.Clamp(Mathf.CeilToInt(p * _count) - 1, 0, _count - 1);
            return _sorted[i];
        }
    }
}
