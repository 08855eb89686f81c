// A small JSON reader/writer over the same value model as the msgpack codec (MsgMap, List<object>, string,
// long/ulong, double, bool, null), for save games (NpcConversation) and test data. A number with a decimal
// point or an exponent is a double, one without is an integer (the convention of PROTOCOL.md §9).
using System;
using System.Collections;
using System.Collections.Generic;
using System.Globalization;
using System.Text;

namespace Gllm
{
    public sealed class JsonException : Exception
    {
        public JsonException(string message) : base(message) { }
    }

    public static class Json
    {
        public static object Parse(string text)
        {
            if (text == null) throw new ArgumentNullException("text");
            int pos = 0;
            object v = ReadValue(text, ref pos, 0);
            SkipWs(text, ref pos);
            if (pos != text.Length) throw new JsonException("trailing characters at " + pos);
            return v;
        }

        public static string Serialize(object value)
        {
            var sb = new StringBuilder();
            Write(sb, value);
            return sb.ToString();
        }

        static void SkipWs(string s, ref int pos)
        {
            while (pos < s.Length && (s[pos] == ' ' || s[pos] == '\t' || s[pos] == '\n' || s[pos] == '\r')) pos++;
        }

        static object ReadValue(string s, ref int pos, int depth)
        {
            if (depth > 256) throw new JsonException("nested too deeply");
            SkipWs(s, ref pos);
            if (pos >= s.Length) throw new JsonException("unexpected end");
            char c = s[pos];
            if (c == '{')
            {
                pos++;
                var map = new MsgMap();
                SkipWs(s, ref pos);
                if (pos < s.Length && s[pos] == '}') { pos++; return map; }
                while (true)
                {
                    SkipWs(s, ref pos);
                    if (pos >= s.Length || s[pos] != '"') throw new JsonException("expected a key at " + pos);
                    string key = ReadString(s, ref pos);
                    SkipWs(s, ref pos);
                    if (pos >= s.Length || s[pos] != ':') throw new JsonException("expected ':' at " + pos);
                    pos++;
                    map.Set(key, ReadValue(s, ref pos, depth + 1));
                    SkipWs(s, ref pos);
                    if (pos < s.Length && s[pos] == ',') { pos++; continue; }
                    if (pos < s.Length && s[pos] == '}') { pos++; return map; }
                    throw new JsonException("expected ',' or '}' at " + pos);
                }
            }
            if (c == '[')
            {
                pos++;
                var list = new List<object>();
                SkipWs(s, ref pos);
                if (pos < s.Length && s[pos] == ']') { pos++; return list; }
                while (true)
                {
                    list.Add(ReadValue(s, ref pos, depth + 1));
                    SkipWs(s, ref pos);
                    if (pos < s.Length && s[pos] == ',') { pos++; continue; }
                    if (pos < s.Length && s[pos] == ']') { pos++; return list; }
                    throw new JsonException("expected ',' or ']' at " + pos);
                }
            }
            if (c == '"') return ReadString(s, ref pos);
            if (Match(s, ref pos, "true")) return true;
            if (Match(s, ref pos, "false")) return false;
            if (Match(s, ref pos, "null")) return null;
            return ReadNumber(s, ref pos);
        }

        static bool Match(string s, ref int pos, string word)
        {
            if (string.CompareOrdinal(s, pos, word, 0, word.Length) != 0) return false;
            pos += word.Length;
            return true;
        }

        static object ReadNumber(string s, ref int pos)
        {
            int start = pos;
            bool isFloat = false;
            if (pos < s.Length && s[pos] == '-') pos++;
            while (pos < s.Length)
            {
                char c = s[pos];
                if (c >= '0' && c <= '9') { pos++; continue; }
                if (c == '.' || c == 'e' || c == 'E' || c == '+' || c == '-') { isFloat = true; pos++; continue; }
                break;
            }
            string t = s.Substring(start, pos - start);
            if (t.Length == 0 || t == "-") throw new JsonException("unexpected character at " + start);
            if (!isFloat)
            {
                long l;
                if (long.TryParse(t, NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out l)) return l;
                ulong u;
                if (ulong.TryParse(t, NumberStyles.None, CultureInfo.InvariantCulture, out u)) return u;
            }
            double d;
            if (double.TryParse(t, NumberStyles.Float, CultureInfo.InvariantCulture, out d)) return d;
            throw new JsonException("bad number '" + t + "'");
        }

        static string ReadString(string s, ref int pos)
        {
            pos++; // opening quote
            var sb = new StringBuilder();
            while (true)
            {
                if (pos >= s.Length) throw new JsonException("unterminated string");
                char c = s[pos++];
                if (c == '"') return sb.ToString();
                if (c != '\\') { sb.Append(c); continue; }
                if (pos >= s.Length) throw new JsonException("unterminated escape");
                char e = s[pos++];
                switch (e)
                {
                    case '"': sb.Append('"'); break;
                    case '\\': sb.Append('\\'); break;
                    case '/': sb.Append('/'); break;
                    case 'b': sb.Append('\b'); break;
                    case 'f': sb.Append('\f'); break;
                    case 'n': sb.Append('\n'); break;
                    case 'r': sb.Append('\r'); break;
                    case 't': sb.Append('\t'); break;
                    case 'u':
                        if (pos + 4 > s.Length) throw new JsonException("bad \\u escape");
                        sb.Append((char)int.Parse(s.Substring(pos, 4), NumberStyles.HexNumber, CultureInfo.InvariantCulture));
                        pos += 4;
                        break;
                    default: throw new JsonException("bad escape \\" + e);
                }
            }
        }

        static void Write(StringBuilder sb, object v)
        {
            if (v == null) { sb.Append("null"); return; }
            if (v is string) { WriteString(sb, (string)v); return; }
            if (v is bool) { sb.Append((bool)v ? "true" : "false"); return; }
            if (v is double || v is float)
            {
                double d = v is double ? (double)v : (float)v;
                if (double.IsNaN(d) || double.IsInfinity(d)) { sb.Append("null"); return; }
                string t = d.ToString("R", CultureInfo.InvariantCulture);
                if (t.IndexOf('.') < 0 && t.IndexOf('E') < 0) t += ".0";
                sb.Append(t);
                return;
            }
            if (v is long || v is int || v is short || v is sbyte || v is ulong || v is uint || v is ushort || v is byte)
            {
                sb.Append(Convert.ToString(v, CultureInfo.InvariantCulture));
                return;
            }
            if (v is ChatMessage)
            {
                var m = (ChatMessage)v;
                sb.Append("{\"role\":"); WriteString(sb, m.Role);
                sb.Append(",\"content\":"); WriteString(sb, m.Content); sb.Append('}');
                return;
            }
            var map = v as MsgMap;
            if (map != null)
            {
                sb.Append('{');
                for (int i = 0; i < map.Count; i++)
                {
                    if (i > 0) sb.Append(',');
                    var kv = map.At(i);
                    WriteString(sb, kv.Key); sb.Append(':'); Write(sb, kv.Value);
                }
                sb.Append('}');
                return;
            }
            var dict = v as IDictionary<string, object>;
            if (dict != null)
            {
                sb.Append('{');
                bool first = true;
                foreach (var kv in dict)
                {
                    if (!first) sb.Append(',');
                    first = false;
                    WriteString(sb, kv.Key); sb.Append(':'); Write(sb, kv.Value);
                }
                sb.Append('}');
                return;
            }
            var list = v as IList;
            if (list != null)
            {
                sb.Append('[');
                for (int i = 0; i < list.Count; i++) { if (i > 0) sb.Append(','); Write(sb, list[i]); }
                sb.Append(']');
                return;
            }
            throw new JsonException("cannot serialise a " + v.GetType().Name);
        }

        static void WriteString(StringBuilder sb, string s)
        {
            sb.Append('"');
            foreach (char c in s)
            {
                switch (c)
                {
                    case '"': sb.Append("\\\""); break;
                    case '\\': sb.Append("\\\\"); break;
                    case '\n': sb.Append("\\n"); break;
                    case '\r': sb.Append("\\r"); break;
                    case '\t': sb.Append("\\t"); break;
                    default:
                        if (c < 0x20) sb.Append("\\u").Append(((int)c).ToString("x4", CultureInfo.InvariantCulture));
                        else sb.Append(c);
                        break;
                }
            }
            sb.Append('"');
        }
    }
}
