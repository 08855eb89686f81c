// ZMTP 3.1 for a DEALER with the NULL mechanism (bindings/PROTOCOL.md §2): the greeting, READY, short and
// long frames, PING -> PONG, ERROR. Pure byte handling: the socket lives in GllmClient's I/O thread.
using System;
using System.Collections.Generic;
using System.Text;

namespace Gllm
{
    public sealed class ZmtpException : Exception
    {
        public ZmtpException(string message) : base(message) { }
    }

    public static class Zmtp
    {
        public const int GreetingSize = 64;
        public const byte FlagMore = 0x01, FlagLong = 0x02, FlagCommand = 0x04;

        /// <summary>The 64-byte greeting (vector zmtp-greeting): signature, version 3.1, mechanism NULL.</summary>
        public static byte[] Greeting()
        {
            var g = new byte[GreetingSize];
            g[0] = 0xff;
            g[8] = 0x01;
            g[9] = 0x7f;
            g[10] = 3;
            g[11] = 1;
            g[12] = (byte)'N'; g[13] = (byte)'U'; g[14] = (byte)'L'; g[15] = (byte)'L';
            return g;
        }

        /// <summary>A READY command frame with Socket-Type and an empty Identity (vector zmtp-ready-dealer).</summary>
        public static byte[] Ready(string socketType)
        {
            var body = new ByteBuffer(64);
            AddShortString(body, "READY");
            AddProperty(body, "Socket-Type", Encoding.ASCII.GetBytes(socketType));
            AddProperty(body, "Identity", new byte[0]);
            var frame = new ByteBuffer(body.Length + 9);
            WriteHeader(frame, FlagCommand, body.Length);
            frame.Add(body.Data, 0, body.Length);
            return frame.ToArray();
        }

        /// <summary>What a client writes first, in one write (vector zmtp-client-opening).</summary>
        public static byte[] ClientOpening()
        {
            var b = new ByteBuffer(128);
            b.Add(Greeting());
            b.Add(Ready("DEALER"));
            return b.ToArray();
        }

        /// <summary>A PONG command echoing a PING's context (vector zmtp-pong for an empty context).</summary>
        public static byte[] Pong(byte[] context, int offset, int count)
        {
            var body = new ByteBuffer(8 + count);
            AddShortString(body, "PONG");
            if (count > 0) body.Add(context, offset, count);
            var frame = new ByteBuffer(body.Length + 9);
            WriteHeader(frame, FlagCommand, body.Length);
            frame.Add(body.Data, 0, body.Length);
            return frame.ToArray();
        }

        /// <summary>A frame header: short form for 0-255 bytes, long (8-byte size) above (§2.2).</summary>
        public static void WriteHeader(ByteBuffer dst, byte flags, long size)
        {
            if (size < 0) throw new ArgumentOutOfRangeException("size");
            if (size <= 255)
            {
                dst.Add((byte)(flags & ~FlagLong));
                dst.Add((byte)size);
            }
            else
            {
                dst.Add((byte)(flags | FlagLong));
                dst.AddBigEndian((ulong)size, 8);
            }
        }

        /// <summary>One message frame (MORE clear) around a msgpack body.</summary>
        public static byte[] MessageFrame(byte[] body, int offset, int count)
        {
            var b = new ByteBuffer(count + 9);
            WriteHeader(b, 0, count);
            b.Add(body, offset, count);
            return b.ToArray();
        }

        public static byte[] MessageFrame(byte[] body) { return MessageFrame(body, 0, body.Length); }

        /// <summary>Checks a peer's greeting (§2.1); throws ZmtpException when the connection must be closed.</summary>
        public static void CheckGreeting(byte[] g, int offset)
        {
            if (g[offset] != 0xff) throw new ZmtpException("not a ZMTP peer (greeting byte 0 is not ff)");
            if ((g[offset + 9] & 1) == 0) throw new ZmtpException("not a ZMTP peer (greeting byte 9, bit 0 clear)");
            if (g[offset + 10] < 3) throw new ZmtpException("the peer speaks ZMTP " + g[offset + 10] + ", not 3");
            var mech = new StringBuilder();
            for (int i = 12; i < 32 && g[offset + i] != 0; i++) mech.Append((char)g[offset + i]);
            if (mech.ToString() != "NULL")
                throw new ZmtpException("the server uses the " + mech + " security mechanism; this client speaks only NULL");
        }

        /// <summary>Splits a command body into its name and data.</summary>
        public static string CommandName(byte[] body, int offset, int count, out int dataOffset)
        {
            if (count < 1 || body[offset] > count - 1) throw new ZmtpException("malformed command frame");
            int n = body[offset];
            dataOffset = offset + 1 + n;
            return Encoding.ASCII.GetString(body, offset + 1, n);
        }

        /// <summary>The properties of a READY command's data (name -> value).</summary>
        public static Dictionary<string, byte[]> ParseProperties(byte[] d, int offset, int end)
        {
            var props = new Dictionary<string, byte[]>(StringComparer.OrdinalIgnoreCase);
            int pos = offset;
            while (pos < end)
            {
                int n = d[pos++];
                if (end - pos < n + 4) throw new ZmtpException("malformed READY property");
                string name = Encoding.ASCII.GetString(d, pos, n);
                pos += n;
                long len = ((long)d[pos] << 24) | ((long)d[pos + 1] << 16) | ((long)d[pos + 2] << 8) | d[pos + 3];
                pos += 4;
                if (end - pos < len) throw new ZmtpException("malformed READY property value");
                var value = new byte[len];
                Buffer.BlockCopy(d, pos, value, 0, (int)len);
                pos += (int)len;
                props[name] = value;
            }
            return props;
        }

        static void AddShortString(ByteBuffer b, string s)
        {
            b.Add((byte)s.Length);
            b.Add(Encoding.ASCII.GetBytes(s));
        }

        static void AddProperty(ByteBuffer b, string name, byte[] value)
        {
            AddShortString(b, name);
            b.AddBigEndian((ulong)value.Length, 4);
            b.Add(value);
        }
    }

    /// <summary>Incremental reader of a ZMTP stream: first the 64-byte greeting, then frames. Keeps partial input
    /// between Feed calls. A returned frame's body points into the reader's buffer and is valid until the
    /// next Feed.</summary>
    public sealed class ZmtpReader
    {
        byte[] _buf = new byte[64 * 1024];
        int _start, _end;
        bool _greeted;
        readonly long _maxFrameBytes;

        public ZmtpReader(long maxFrameBytes = 64L * 1024 * 1024) { _maxFrameBytes = maxFrameBytes; }

        public bool GreetingDone { get { return _greeted; } }

        /// <summary>Space to receive into directly (avoids a copy): write at Buffer[WriteOffset..], then Commit(n).</summary>
        public byte[] Buffer { get { return _buf; } }
        public int WriteOffset { get { return _end; } }

        public int PrepareWrite(int minFree)
        {
            if (_start == _end) { _start = _end = 0; }
            if (_buf.Length - _end < minFree)
            {
                int live = _end - _start;
                if (_start > 0)
                {
                    System.Buffer.BlockCopy(_buf, _start, _buf, 0, live);
                    _start = 0; _end = live;
                }
                if (_buf.Length - _end < minFree)
                {
                    int cap = _buf.Length;
                    while (cap - _end < minFree) cap *= 2;
                    Array.Resize(ref _buf, cap);
                }
            }
            return _buf.Length - _end;
        }

        public void Commit(int count) { _end += count; }

        public void Feed(byte[] data, int offset, int count)
        {
            PrepareWrite(count);
            System.Buffer.BlockCopy(data, offset, _buf, _end, count);
            _end += count;
        }

        /// <summary>Checks the greeting once 64 bytes are in; true when done.</summary>
        public bool TryGreeting()
        {
            if (_greeted) return true;
            if (_end - _start < Zmtp.GreetingSize) return false;
            Zmtp.CheckGreeting(_buf, _start);
            _start += Zmtp.GreetingSize;
            _greeted = true;
            return true;
        }

        /// <summary>The next whole frame, if buffered.</summary>
        public bool TryFrame(out byte flags, out byte[] body, out int offset, out int count)
        {
            body = _buf; offset = 0; count = 0; flags = 0;
            if (!_greeted && !TryGreeting()) return false;
            int avail = _end - _start;
            if (avail < 2) return false;
            byte f = _buf[_start];
            if ((f & 0xf8) != 0) throw new ZmtpException(string.Format("bad frame flags 0x{0:x2}", f));
            long size;
            int header;
            if ((f & Zmtp.FlagLong) != 0)
            {
                if (avail < 9) return false;
                ulong s = 0;
                for (int i = 1; i <= 8; i++) s = (s << 8) | _buf[_start + i];
                if (s > (ulong)_maxFrameBytes) throw new ZmtpException("a frame of " + s + " bytes is over the limit");
                size = (long)s;
                header = 9;
            }
            else
            {
                size = _buf[_start + 1];
                header = 2;
            }
            if (avail < header + size)
            {
                PrepareWrite((int)(header + size - avail));   // make room for the rest of this frame
                return false;
            }
            flags = f;
            offset = _start + header;
            count = (int)size;
            _start += header + (int)size;
            return true;
        }
    }
}
