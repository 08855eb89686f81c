// The msgpack subset of the gllm bridge protocol (bindings/PROTOCOL.md §3): string-keyed maps, str, int
// (including uint64), float64 (float32 read), bool, nil, arrays, bin. Encodes in the canonical shortest form
// the test vectors of §9 show; decodes every form §3 allows. Plain C# 7.2, no reflection: IL2CPP-safe.
using System;
using System.Collections;
using System.Collections.Generic;
using System.Text;

namespace Gllm
{
    /// <summary>A msgpack/JSON map with string keys that keeps insertion order (the wire's key order).</summary>
    public sealed class MsgMap : IEnumerable<KeyValuePair<string, object>>
    {
        readonly List<KeyValuePair<string, object>> _items;

        public MsgMap() { _items = new List<KeyValuePair<string, object>>(); }
        public MsgMap(int capacity) { _items = new List<KeyValuePair<string, object>>(capacity); }

        public int Count { get { return _items.Count; } }

        /// <summary>The value of a key, or null when it is absent (nil and absent mean the same in the protocol).</summary>
        public object this[string key]
        {
            get { object v; return TryGetValue(key, out v) ? v : null; }
            set { Set(key, value); }
        }

        /// <summary>Adds a key, or replaces its value where present (keys stay unique).</summary>
        public MsgMap Set(string key, object value)
        {
            if (key == null) throw new ArgumentNullException("key");
            for (int i = 0; i < _items.Count; i++)
                if (string.Equals(_items[i].Key, key, StringComparison.Ordinal))
                {
                    _items[i] = new KeyValuePair<string, object>(key, value);
                    return this;
                }
            _items.Add(new KeyValuePair<string, object>(key, value));
            return this;
        }

        public void Add(string key, object value) { Set(key, value); }

        public bool ContainsKey(string key) { object v; return TryGetValue(key, out v); }

        public bool TryGetValue(string key, out object value)
        {
            for (int i = 0; i < _items.Count; i++)
                if (string.Equals(_items[i].Key, key, StringComparison.Ordinal))
                {
                    value = _items[i].Value;
                    return true;
                }
            value = null;
            return false;
        }

        public bool Remove(string key)
        {
            for (int i = 0; i < _items.Count; i++)
                if (string.Equals(_items[i].Key, key, StringComparison.Ordinal))
                {
                    _items.RemoveAt(i);
                    return true;
                }
            return false;
        }

        public KeyValuePair<string, object> At(int index) { return _items[index]; }

        public string GetString(string key) { return this[key] as string; }
        public MsgMap GetMap(string key) { return this[key] as MsgMap; }
        public List<object> GetList(string key) { return this[key] as List<object>; }

        /// <summary>An integer field (nil, absent or not an integer: null).</summary>
        public long? GetLong(string key) { return MsgValue.AsLong(this[key]); }

        /// <summary>A float field; integers are accepted as floats, like the server does.</summary>
        public double? GetDouble(string key) { return MsgValue.AsDouble(this[key]); }

        public bool? GetBool(string key) { object v = this[key]; if (v is bool) return (bool)v; return null; }

        public IEnumerator<KeyValuePair<string, object>> GetEnumerator() { return _items.GetEnumerator(); }
        IEnumerator IEnumerable.GetEnumerator() { return _items.GetEnumerator(); }
    }

    /// <summary>Helpers over decoded values: long/ulong for integers, double for floats, string, bool, null,
    /// MsgMap, List&lt;object&gt;, byte[] (bin).</summary>
    public static class MsgValue
    {
        public static long? AsLong(object v)
        {
            if (v is long) return (long)v;
            if (v is ulong && (ulong)v <= long.MaxValue) return (long)(ulong)v;
            if (v is int) return (int)v;
            return null;
        }

        public static double? AsDouble(object v)
        {
            if (v is double) return (double)v;
            if (v is float) return (float)v;
            if (v is long) return (long)v;
            if (v is ulong) return (ulong)v;
            if (v is int) return (int)v;
            return null;
        }

        /// <summary>Structural equality with exact types (an int is not a float), as the test vectors need.</summary>
        public static bool DeepEquals(object a, object b)
        {
            if (a == null || b == null) return a == null && b == null;
            if (a is int) a = (long)(int)a;
            if (b is int) b = (long)(int)b;
            if (a is ulong && (ulong)a <= long.MaxValue) a = (long)(ulong)a;
            if (b is ulong && (ulong)b <= long.MaxValue) b = (long)(ulong)b;
            if (a is MsgMap)
            {
                var ma = (MsgMap)a; var mb = b as MsgMap;
                if (mb == null || ma.Count != mb.Count) return false;
                for (int i = 0; i < ma.Count; i++)
                {
                    object other;
                    var kv = ma.At(i);
                    if (!mb.TryGetValue(kv.Key, out other) || !DeepEquals(kv.Value, other)) return false;
                }
                return true;
            }
            if (a is List<object>)
            {
                var la = (List<object>)a; var lb = b as List<object>;
                if (lb == null || la.Count != lb.Count) return false;
                for (int i = 0; i < la.Count; i++) if (!DeepEquals(la[i], lb[i])) return false;
                return true;
            }
            if (a is byte[])
            {
                var ba = (byte[])a; var bb = b as byte[];
                if (bb == null || ba.Length != bb.Length) return false;
                for (int i = 0; i < ba.Length; i++) if (ba[i] != bb[i]) return false;
                return true;
            }
            if (a.GetType() != b.GetType()) return false;
            if (a is double) return ((double)a).Equals((double)b);
            return a.Equals(b);
        }
    }

    public sealed class MsgPackException : Exception
    {
        public MsgPackException(string message) : base(message) { }
    }

    /// <summary>A growable byte buffer (what the encoder writes into and frames are built in).</summary>
    public sealed class ByteBuffer
    {
        byte[] _data;
        int _length;

        public ByteBuffer(int capacity = 256) { _data = new byte[Math.Max(16, capacity)]; }

        public byte[] Data { get { return _data; } }
        public int Length { get { return _length; } }
        public void Clear() { _length = 0; }

        public void Reserve(int extra)
        {
            int need = _length + extra;
            if (need <= _data.Length) return;
            int cap = _data.Length;
            while (cap < need) cap = cap < (1 << 29) ? cap * 2 : need;
            Array.Resize(ref _data, cap);
        }

        public void Add(byte b) { Reserve(1); _data[_length++] = b; }

        public void Add(byte[] src, int offset, int count)
        {
            Reserve(count);
            Buffer.BlockCopy(src, offset, _data, _length, count);
            _length += count;
        }

        public void Add(byte[] src) { Add(src, 0, src.Length); }

        public void AddBigEndian(ulong value, int bytes)
        {
            Reserve(bytes);
            for (int i = bytes - 1; i >= 0; i--) _data[_length++] = (byte)(value >> (8 * i));
        }

        /// <summary>Advances the length after writing into Data directly (after Reserve).</summary>
        public void Advance(int count) { _length += count; }

        public byte[] ToArray()
        {
            var r = new byte[_length];
            Buffer.BlockCopy(_data, 0, r, 0, _length);
            return r;
        }
    }

    /// <summary>Canonical msgpack encoder: shortest headers, every float as float64, str never bin.</summary>
    public sealed class MsgPackWriter
    {
        static readonly UTF8Encoding Utf8 = new UTF8Encoding(false, false);
        readonly ByteBuffer _buf;

        public MsgPackWriter(ByteBuffer buffer) { _buf = buffer; }
        public MsgPackWriter() : this(new ByteBuffer()) { }

        public ByteBuffer Buffer { get { return _buf; } }
        public byte[] ToArray() { return _buf.ToArray(); }

        public static byte[] Encode(object value)
        {
            var w = new MsgPackWriter();
            w.Write(value);
            return w.ToArray();
        }

        public void WriteNil() { _buf.Add(0xc0); }
        public void Write(bool value) { _buf.Add(value ? (byte)0xc3 : (byte)0xc2); }

        public void Write(long value)
        {
            if (value >= 0) { Write((ulong)value); return; }
            if (value >= -32) _buf.Add((byte)(sbyte)value);
            else if (value >= sbyte.MinValue) { _buf.Add(0xd0); _buf.AddBigEndian((ulong)value, 1); }
            else if (value >= short.MinValue) { _buf.Add(0xd1); _buf.AddBigEndian((ulong)value, 2); }
            else if (value >= int.MinValue) { _buf.Add(0xd2); _buf.AddBigEndian((ulong)value, 4); }
            else { _buf.Add(0xd3); _buf.AddBigEndian((ulong)value, 8); }
        }

        public void Write(ulong value)
        {
            if (value <= 0x7f) _buf.Add((byte)value);
            else if (value <= byte.MaxValue) { _buf.Add(0xcc); _buf.AddBigEndian(value, 1); }
            else if (value <= ushort.MaxValue) { _buf.Add(0xcd); _buf.AddBigEndian(value, 2); }
            else if (value <= uint.MaxValue) { _buf.Add(0xce); _buf.AddBigEndian(value, 4); }
            else { _buf.Add(0xcf); _buf.AddBigEndian(value, 8); }
        }

        public void Write(double value)
        {
            _buf.Add(0xcb);
            _buf.AddBigEndian((ulong)BitConverter.DoubleToInt64Bits(value), 8);
        }

        public void Write(string value)
        {
            if (value == null) { WriteNil(); return; }
            int n = Utf8.GetByteCount(value);
            if (n <= 31) _buf.Add((byte)(0xa0 | n));
            else if (n <= byte.MaxValue) { _buf.Add(0xd9); _buf.AddBigEndian((ulong)n, 1); }
            else if (n <= ushort.MaxValue) { _buf.Add(0xda); _buf.AddBigEndian((ulong)n, 2); }
            else { _buf.Add(0xdb); _buf.AddBigEndian((ulong)n, 4); }
            _buf.Reserve(n);
            Utf8.GetBytes(value, 0, value.Length, _buf.Data, _buf.Length);
            _buf.Advance(n);
        }

        public void WriteBin(byte[] value, int offset, int count)
        {
            if (count <= byte.MaxValue) { _buf.Add(0xc4); _buf.AddBigEndian((ulong)count, 1); }
            else if (count <= ushort.MaxValue) { _buf.Add(0xc5); _buf.AddBigEndian((ulong)count, 2); }
            else { _buf.Add(0xc6); _buf.AddBigEndian((ulong)count, 4); }
            _buf.Add(value, offset, count);
        }

        public void WriteArrayHeader(int count)
        {
            if (count <= 15) _buf.Add((byte)(0x90 | count));
            else if (count <= ushort.MaxValue) { _buf.Add(0xdc); _buf.AddBigEndian((ulong)count, 2); }
            else { _buf.Add(0xdd); _buf.AddBigEndian((ulong)count, 4); }
        }

        public void WriteMapHeader(int count)
        {
            if (count <= 15) _buf.Add((byte)(0x80 | count));
            else if (count <= ushort.MaxValue) { _buf.Add(0xde); _buf.AddBigEndian((ulong)count, 2); }
            else { _buf.Add(0xdf); _buf.AddBigEndian((ulong)count, 4); }
        }

        /// <summary>Any supported value: null, bool, string, integers, float/double, byte[], MsgMap,
        /// IDictionary with string keys, IList/arrays, ChatMessage.</summary>
        public void Write(object value)
        {
            if (value == null) { WriteNil(); return; }
            if (value is string) { Write((string)value); return; }
            if (value is bool) { Write((bool)value); return; }
            if (value is long) { Write((long)value); return; }
            if (value is int) { Write((long)(int)value); return; }
            if (value is ulong) { Write((ulong)value); return; }
            if (value is uint) { Write((ulong)(uint)value); return; }
            if (value is short) { Write((long)(short)value); return; }
            if (value is ushort) { Write((ulong)(ushort)value); return; }
            if (value is sbyte) { Write((long)(sbyte)value); return; }
            if (value is byte) { Write((ulong)(byte)value); return; }
            if (value is double) { Write((double)value); return; }
            if (value is float) { Write((double)(float)value); return; }
            if (value is byte[]) { var b = (byte[])value; WriteBin(b, 0, b.Length); return; }
            if (value is ChatMessage) { ((ChatMessage)value).WriteTo(this); return; }
            var map = value as MsgMap;
            if (map != null)
            {
                WriteMapHeader(map.Count);
                for (int i = 0; i < map.Count; i++) { var kv = map.At(i); Write(kv.Key); Write(kv.Value); }
                return;
            }
            var dict = value as IDictionary<string, object>;
            if (dict != null)
            {
                WriteMapHeader(dict.Count);
                foreach (var kv in dict) { Write(kv.Key); Write(kv.Value); }
                return;
            }
            var sdict = value as IDictionary<string, string>;
            if (sdict != null)
            {
                WriteMapHeader(sdict.Count);
                foreach (var kv in sdict) { Write(kv.Key); Write(kv.Value); }
                return;
            }
            var list = value as IList;
            if (list != null)
            {
                WriteArrayHeader(list.Count);
                for (int i = 0; i < list.Count; i++) Write(list[i]);
                return;
            }
            throw new MsgPackException("cannot encode a " + value.GetType().Name);
        }
    }

    /// <summary>msgpack decoder: every encoding §3 allows. Maps become MsgMap (keys must be strings), arrays
    /// List&lt;object&gt;, integers long (ulong above long.MaxValue), floats double, bin byte[].</summary>
    public static class MsgPackReader
    {
        public const int MaxDepth = 64;
        static readonly UTF8Encoding Utf8 = new UTF8Encoding(false, false);

        public static object Decode(byte[] data) { return Decode(data, 0, data.Length); }

        /// <summary>Decodes exactly one value filling data[offset, offset+count); anything else throws.</summary>
        public static object Decode(byte[] data, int offset, int count)
        {
            if (offset < 0 || count < 0 || offset + count > data.Length) throw new ArgumentOutOfRangeException("count");
            int pos = offset;
            int end = offset + count;
            object v = Read(data, ref pos, end, 0);
            if (pos != end) throw new MsgPackException("trailing bytes after the msgpack value");
            return v;
        }

        static void Need(int pos, int end, long n)
        {
            if (n < 0 || end - pos < n) throw new MsgPackException("truncated msgpack");
        }

        static ulong Be(byte[] d, ref int pos, int end, int n)
        {
            Need(pos, end, n);
            ulong v = 0;
            for (int i = 0; i < n; i++) v = (v << 8) | d[pos + i];
            pos += n;
            return v;
        }

        static object Read(byte[] d, ref int pos, int end, int depth)
        {
            if (depth > MaxDepth) throw new MsgPackException("msgpack nested too deeply");
            Need(pos, end, 1);
            byte b = d[pos++];
            if (b <= 0x7f) return (long)b;
            if (b >= 0xe0) return (long)(sbyte)b;
            if (b >= 0xa0 && b <= 0xbf) return ReadStr(d, ref pos, end, b & 0x1f);
            if (b >= 0x90 && b <= 0x9f) return ReadArray(d, ref pos, end, b & 0x0f, depth);
            if (b >= 0x80 && b <= 0x8f) return ReadMap(d, ref pos, end, b & 0x0f, depth);
            switch (b)
            {
                case 0xc0: return null;
                case 0xc2: return false;
                case 0xc3: return true;
                case 0xcc: return (long)Be(d, ref pos, end, 1);
                case 0xcd: return (long)Be(d, ref pos, end, 2);
                case 0xce: return (long)Be(d, ref pos, end, 4);
                case 0xcf:
                {
                    ulong u = Be(d, ref pos, end, 8);
                    if (u <= long.MaxValue) return (long)u;
                    return u;
                }
                case 0xd0: return (long)(sbyte)Be(d, ref pos, end, 1);
                case 0xd1: return (long)(short)Be(d, ref pos, end, 2);
                case 0xd2: return (long)(int)Be(d, ref pos, end, 4);
                case 0xd3: return (long)Be(d, ref pos, end, 8);
                case 0xca:
                {
                    uint bits = (uint)Be(d, ref pos, end, 4);
                    var tmp = BitConverter.GetBytes(bits); // native order of the same integer: round-trips
                    return (double)BitConverter.ToSingle(tmp, 0);
                }
                case 0xcb: return BitConverter.Int64BitsToDouble((long)Be(d, ref pos, end, 8));
                case 0xd9: return ReadStr(d, ref pos, end, (long)Be(d, ref pos, end, 1));
                case 0xda: return ReadStr(d, ref pos, end, (long)Be(d, ref pos, end, 2));
                case 0xdb: return ReadStr(d, ref pos, end, (long)Be(d, ref pos, end, 4));
                case 0xc4: return ReadBin(d, ref pos, end, (long)Be(d, ref pos, end, 1));
                case 0xc5: return ReadBin(d, ref pos, end, (long)Be(d, ref pos, end, 2));
                case 0xc6: return ReadBin(d, ref pos, end, (long)Be(d, ref pos, end, 4));
                case 0xdc: return ReadArray(d, ref pos, end, (long)Be(d, ref pos, end, 2), depth);
                case 0xdd: return ReadArray(d, ref pos, end, (long)Be(d, ref pos, end, 4), depth);
                case 0xde: return ReadMap(d, ref pos, end, (long)Be(d, ref pos, end, 2), depth);
                case 0xdf: return ReadMap(d, ref pos, end, (long)Be(d, ref pos, end, 4), depth);
            }
            throw new MsgPackException(string.Format("unsupported msgpack type 0x{0:x2}", b));
        }

        static string ReadStr(byte[] d, ref int pos, int end, long n)
        {
            Need(pos, end, n);
            string s = n == 0 ? string.Empty : Utf8.GetString(d, pos, (int)n);
            pos += (int)n;
            return s;
        }

        static byte[] ReadBin(byte[] d, ref int pos, int end, long n)
        {
            Need(pos, end, n);
            var r = new byte[n];
            Buffer.BlockCopy(d, pos, r, 0, (int)n);
            pos += (int)n;
            return r;
        }

        static List<object> ReadArray(byte[] d, ref int pos, int end, long n, int depth)
        {
            Need(pos, end, n);  // every element takes at least one byte: no huge allocation from a bad header
            var list = new List<object>((int)n);
            for (long i = 0; i < n; i++) list.Add(Read(d, ref pos, end, depth + 1));
            return list;
        }

        static MsgMap ReadMap(byte[] d, ref int pos, int end, long n, int depth)
        {
            Need(pos, end, 2 * n);
            var map = new MsgMap((int)n);
            for (long i = 0; i < n; i++)
            {
                var key = Read(d, ref pos, end, depth + 1) as string;
                if (key == null) throw new MsgPackException("a map key is not a string");
                map.Set(key, Read(d, ref pos, end, depth + 1));
            }
            return map;
        }
    }
}
