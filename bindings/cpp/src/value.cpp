// Value, the msgpack codec and the JSON codec (see value.h).
#include "gllm/value.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>

namespace gllm {

// ---------------------------------------------------------------------------------------------- Value
Value Value::boolean(bool b) { Value v; v.type_ = Type::Bool; v.b_ = b; return v; }
Value Value::integer(int64_t i) { Value v; v.type_ = Type::Int; v.i_ = i; return v; }
Value Value::uinteger(uint64_t u) {
    Value v;
    v.type_ = u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ? Type::UInt : Type::Int;
    v.i_ = static_cast<int64_t>(u);
    return v;
}
Value Value::number(double d) { Value v; v.type_ = Type::Float; v.d_ = d; return v; }
Value Value::string(std::string s) { Value v; v.type_ = Type::Str; v.s_ = std::move(s); return v; }
Value Value::binary(std::string b) { Value v; v.type_ = Type::Bin; v.s_ = std::move(b); return v; }
Value Value::array() { Value v; v.type_ = Type::Array; return v; }
Value Value::map() { Value v; v.type_ = Type::Map; return v; }

double Value::as_double() const {
    if (type_ == Type::Float) return d_;
    if (type_ == Type::UInt) return static_cast<double>(static_cast<uint64_t>(i_));
    if (type_ == Type::Int) return static_cast<double>(i_);
    return 0.0;
}

Value& Value::set(std::string_view key, Value v) {
    for (size_t i = 0; i < keys_.size(); i++)
        if (keys_[i] == key) { items_[i] = std::move(v); return items_[i]; }
    keys_.emplace_back(key);
    items_.push_back(std::move(v));
    return items_.back();
}

const Value* Value::find(std::string_view key) const {
    for (size_t i = 0; i < keys_.size(); i++)
        if (keys_[i] == key) return &items_[i];
    return nullptr;
}

bool Value::remove(std::string_view key) {
    for (size_t i = 0; i < keys_.size(); i++)
        if (keys_[i] == key) {
            keys_.erase(keys_.begin() + static_cast<std::ptrdiff_t>(i));
            items_.erase(items_.begin() + static_cast<std::ptrdiff_t>(i));
            return true;
        }
    return false;
}

void Value::reserve(size_t n) {
    items_.reserve(n);
    if (type_ == Type::Map) keys_.reserve(n);
}

const std::string* Value::get_string(std::string_view key) const {
    const Value* v = find(key);
    return v && v->type_ == Type::Str ? &v->s_ : nullptr;
}
std::optional<int64_t> Value::get_int(std::string_view key) const {
    const Value* v = find(key);
    if (v && v->is_int()) return v->i_;
    return std::nullopt;
}
std::optional<double> Value::get_double(std::string_view key) const {
    const Value* v = find(key);
    if (v && (v->is_float() || v->is_int())) return v->as_double();
    return std::nullopt;
}
std::optional<bool> Value::get_bool(std::string_view key) const {
    const Value* v = find(key);
    if (v && v->type_ == Type::Bool) return v->b_;
    return std::nullopt;
}
const Value* Value::get_map(std::string_view key) const {
    const Value* v = find(key);
    return v && v->type_ == Type::Map ? v : nullptr;
}
const Value* Value::get_array(std::string_view key) const {
    const Value* v = find(key);
    return v && v->type_ == Type::Array ? v : nullptr;
}

bool Value::equals(const Value& o, bool ordered_keys) const {
    if (type_ != o.type_) return false;
    switch (type_) {
        case Type::Nil: return true;
        case Type::Bool: return b_ == o.b_;
        case Type::Int: case Type::UInt: return i_ == o.i_;
        case Type::Float: return d_ == o.d_ || (std::isnan(d_) && std::isnan(o.d_));
        case Type::Str: case Type::Bin: return s_ == o.s_;
        case Type::Array:
            if (items_.size() != o.items_.size()) return false;
            for (size_t i = 0; i < items_.size(); i++)
                if (!items_[i].equals(o.items_[i], ordered_keys)) return false;
            return true;
        case Type::Map:
            if (items_.size() != o.items_.size()) return false;
            for (size_t i = 0; i < items_.size(); i++) {
                if (ordered_keys) {
                    if (keys_[i] != o.keys_[i] || !items_[i].equals(o.items_[i], true)) return false;
                } else {
                    const Value* other = o.find(keys_[i]);
                    if (!other || !items_[i].equals(*other, false)) return false;
                }
            }
            return true;
    }
    return false;
}

// ---------------------------------------------------------------------------------------------- msgpack
namespace msgpack {
namespace {

struct Decoder {
    const uint8_t* p;
    const uint8_t* end;
    std::string err;

    bool fail(const char* what) {
        if (err.empty()) err = what;
        return false;
    }
    size_t left() const { return static_cast<size_t>(end - p); }
    bool be(int bytes, uint64_t& v) {
        if (left() < static_cast<size_t>(bytes)) return fail("truncated msgpack");
        v = 0;
        for (int i = 0; i < bytes; i++) v = (v << 8) | *p++;
        return true;
    }
    bool raw(uint64_t n, std::string& s) {
        if (n > left()) return fail("truncated msgpack string");
        s.assign(reinterpret_cast<const char*>(p), static_cast<size_t>(n));
        p += n;
        return true;
    }
    bool items(uint64_t n, bool is_map, Value& out, int depth) {
        // every element takes at least one byte (two for a map entry): refuse counts the input cannot hold
        if (n > left() / (is_map ? 2 : 1)) return fail("a msgpack container longer than its input");
        out = is_map ? Value::map() : Value::array();
        out.reserve(static_cast<size_t>(n));
        for (uint64_t i = 0; i < n; i++) {
            if (is_map) {
                Value k;
                if (!value(k, depth + 1)) return false;
                if (!k.is_string()) return fail("a msgpack map key that is not a string");
                Value v;
                if (!value(v, depth + 1)) return false;
                out.set(k.as_string(), std::move(v));
            } else {
                Value v;
                if (!value(v, depth + 1)) return false;
                out.push(std::move(v));
            }
        }
        return true;
    }
    bool value(Value& out, int depth) {
        if (depth > kMaxDepth) return fail("msgpack nested too deep");
        if (p >= end) return fail("truncated msgpack");
        uint8_t b = *p++;
        uint64_t n = 0;
        if (b <= 0x7f) { out = Value::integer(b); return true; }
        if (b >= 0xe0) { out = Value::integer(static_cast<int8_t>(b)); return true; }
        if ((b & 0xe0) == 0xa0) { std::string s; if (!raw(b & 0x1f, s)) return false; out = Value::string(std::move(s)); return true; }
        if ((b & 0xf0) == 0x90) return items(b & 0x0f, false, out, depth);
        if ((b & 0xf0) == 0x80) return items(b & 0x0f, true, out, depth);
        switch (b) {
            case 0xc0: out = Value::nil(); return true;
            case 0xc2: out = Value::boolean(false); return true;
            case 0xc3: out = Value::boolean(true); return true;
            case 0xcc: if (!be(1, n)) return false; out = Value::integer(static_cast<int64_t>(n)); return true;
            case 0xcd: if (!be(2, n)) return false; out = Value::integer(static_cast<int64_t>(n)); return true;
            case 0xce: if (!be(4, n)) return false; out = Value::integer(static_cast<int64_t>(n)); return true;
            case 0xcf: if (!be(8, n)) return false; out = Value::uinteger(n); return true;
            case 0xd0: if (!be(1, n)) return false; out = Value::integer(static_cast<int8_t>(n)); return true;
            case 0xd1: if (!be(2, n)) return false; out = Value::integer(static_cast<int16_t>(n)); return true;
            case 0xd2: if (!be(4, n)) return false; out = Value::integer(static_cast<int32_t>(n)); return true;
            case 0xd3: if (!be(8, n)) return false; out = Value::integer(static_cast<int64_t>(n)); return true;
            case 0xca: {
                if (!be(4, n)) return false;
                uint32_t u = static_cast<uint32_t>(n);
                float f;
                std::memcpy(&f, &u, 4);
                out = Value::number(static_cast<double>(f));
                return true;
            }
            case 0xcb: {
                if (!be(8, n)) return false;
                double d;
                std::memcpy(&d, &n, 8);
                out = Value::number(d);
                return true;
            }
            case 0xd9: case 0xda: case 0xdb: {
                if (!be(b == 0xd9 ? 1 : b == 0xda ? 2 : 4, n)) return false;
                std::string s;
                if (!raw(n, s)) return false;
                out = Value::string(std::move(s));
                return true;
            }
            case 0xc4: case 0xc5: case 0xc6: {
                if (!be(b == 0xc4 ? 1 : b == 0xc5 ? 2 : 4, n)) return false;
                std::string s;
                if (!raw(n, s)) return false;
                out = Value::binary(std::move(s));
                return true;
            }
            case 0xdc: if (!be(2, n)) return false; return items(n, false, out, depth);
            case 0xdd: if (!be(4, n)) return false; return items(n, false, out, depth);
            case 0xde: if (!be(2, n)) return false; return items(n, true, out, depth);
            case 0xdf: if (!be(4, n)) return false; return items(n, true, out, depth);
            default: break;
        }
        return fail(b == 0xc1 ? "the never-used msgpack byte c1" : "a msgpack ext type (not used by the protocol)");
    }
};

}  // namespace

bool decode(const uint8_t* data, size_t size, Value& out, std::string* error) {
    Decoder d{data, data + size, {}};
    Value v;
    bool ok = d.value(v, 0);
    if (ok && d.p != d.end) ok = d.fail("trailing bytes after the msgpack value");
    if (!ok) {
        if (error) *error = d.err;
        return false;
    }
    out = std::move(v);
    return true;
}

void Writer::be(uint64_t v, int bytes) {
    for (int i = bytes - 1; i >= 0; i--) out_->push_back(static_cast<uint8_t>(v >> (8 * i)));
}
void Writer::nil() { out_->push_back(0xc0); }
void Writer::boolean(bool v) { out_->push_back(v ? 0xc3 : 0xc2); }
void Writer::uinteger(uint64_t v) {
    if (v <= 0x7f) out_->push_back(static_cast<uint8_t>(v));
    else if (v <= 0xff) { out_->push_back(0xcc); be(v, 1); }
    else if (v <= 0xffff) { out_->push_back(0xcd); be(v, 2); }
    else if (v <= 0xffffffffu) { out_->push_back(0xce); be(v, 4); }
    else { out_->push_back(0xcf); be(v, 8); }
}
void Writer::integer(int64_t v) {
    if (v >= 0) { uinteger(static_cast<uint64_t>(v)); return; }
    uint64_t u = static_cast<uint64_t>(v);
    if (v >= -32) out_->push_back(static_cast<uint8_t>(u));
    else if (v >= -128) { out_->push_back(0xd0); be(u, 1); }
    else if (v >= -32768) { out_->push_back(0xd1); be(u, 2); }
    else if (v >= -2147483648LL) { out_->push_back(0xd2); be(u, 4); }
    else { out_->push_back(0xd3); be(u, 8); }
}
void Writer::float64(double v) {
    uint64_t u;
    std::memcpy(&u, &v, 8);
    out_->push_back(0xcb);
    be(u, 8);
}
void Writer::str(std::string_view s) {
    size_t n = s.size();
    if (n <= 31) out_->push_back(static_cast<uint8_t>(0xa0 | n));
    else if (n <= 0xff) { out_->push_back(0xd9); be(n, 1); }
    else if (n <= 0xffff) { out_->push_back(0xda); be(n, 2); }
    else { out_->push_back(0xdb); be(n, 4); }
    out_->insert(out_->end(), s.begin(), s.end());
}
void Writer::bin(std::string_view s) {
    size_t n = s.size();
    if (n <= 0xff) { out_->push_back(0xc4); be(n, 1); }
    else if (n <= 0xffff) { out_->push_back(0xc5); be(n, 2); }
    else { out_->push_back(0xc6); be(n, 4); }
    out_->insert(out_->end(), s.begin(), s.end());
}
void Writer::array_header(size_t n) {
    if (n <= 15) out_->push_back(static_cast<uint8_t>(0x90 | n));
    else if (n <= 0xffff) { out_->push_back(0xdc); be(n, 2); }
    else { out_->push_back(0xdd); be(n, 4); }
}
void Writer::map_header(size_t n) {
    if (n <= 15) out_->push_back(static_cast<uint8_t>(0x80 | n));
    else if (n <= 0xffff) { out_->push_back(0xde); be(n, 2); }
    else { out_->push_back(0xdf); be(n, 4); }
}
void Writer::value(const Value& v) {
    switch (v.type()) {
        case Value::Type::Nil: nil(); return;
        case Value::Type::Bool: boolean(v.as_bool()); return;
        case Value::Type::Int: integer(v.as_int()); return;
        case Value::Type::UInt: uinteger(v.as_uint()); return;
        case Value::Type::Float: float64(v.as_double()); return;
        case Value::Type::Str: str(v.as_string()); return;
        case Value::Type::Bin: bin(v.as_string()); return;
        case Value::Type::Array:
            array_header(v.size());
            for (size_t i = 0; i < v.size(); i++) value(v.at(i));
            return;
        case Value::Type::Map:
            map_header(v.size());
            for (size_t i = 0; i < v.size(); i++) { str(v.key_at(i)); value(v.at(i)); }
            return;
    }
}

std::vector<uint8_t> encode(const Value& v) {
    std::vector<uint8_t> out;
    Writer w(&out);
    w.value(v);
    return out;
}

}  // namespace msgpack

// ---------------------------------------------------------------------------------------------- JSON
namespace json {
namespace {

struct Parser {
    const char* p;
    const char* end;
    std::string err;

    bool fail(const char* what) {
        if (err.empty()) err = what;
        return false;
    }
    void ws() { while (p < end && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t')) p++; }
    bool lit(const char* word) {
        size_t n = std::strlen(word);
        if (static_cast<size_t>(end - p) < n || std::memcmp(p, word, n) != 0) return fail("bad JSON literal");
        p += n;
        return true;
    }
    static void utf8(std::string& s, uint32_t c) {
        if (c < 0x80) s += static_cast<char>(c);
        else if (c < 0x800) { s += static_cast<char>(0xc0 | (c >> 6)); s += static_cast<char>(0x80 | (c & 0x3f)); }
        else if (c < 0x10000) {
            s += static_cast<char>(0xe0 | (c >> 12)); s += static_cast<char>(0x80 | ((c >> 6) & 0x3f));
            s += static_cast<char>(0x80 | (c & 0x3f));
        } else {
            s += static_cast<char>(0xf0 | (c >> 18)); s += static_cast<char>(0x80 | ((c >> 12) & 0x3f));
            s += static_cast<char>(0x80 | ((c >> 6) & 0x3f)); s += static_cast<char>(0x80 | (c & 0x3f));
        }
    }
    bool hex4(uint32_t& c) {
        if (end - p < 4) return fail("truncated \\u escape");
        c = 0;
        for (int i = 0; i < 4; i++) {
            char h = *p++;
            c <<= 4;
            if (h >= '0' && h <= '9') c |= static_cast<uint32_t>(h - '0');
            else if (h >= 'a' && h <= 'f') c |= static_cast<uint32_t>(h - 'a' + 10);
            else if (h >= 'A' && h <= 'F') c |= static_cast<uint32_t>(h - 'A' + 10);
            else return fail("bad \\u escape");
        }
        return true;
    }
    bool str(std::string& s) {
        p++;   // the opening quote
        while (true) {
            if (p >= end) return fail("unterminated JSON string");
            char c = *p++;
            if (c == '"') return true;
            if (c != '\\') { s += c; continue; }
            if (p >= end) return fail("unterminated JSON escape");
            char e = *p++;
            switch (e) {
                case '"': s += '"'; break;
                case '\\': s += '\\'; break;
                case '/': s += '/'; break;
                case 'b': s += '\b'; break;
                case 'f': s += '\f'; break;
                case 'n': s += '\n'; break;
                case 'r': s += '\r'; break;
                case 't': s += '\t'; break;
                case 'u': {
                    uint32_t cp;
                    if (!hex4(cp)) return false;
                    if (cp >= 0xd800 && cp <= 0xdbff && end - p >= 6 && p[0] == '\\' && p[1] == 'u') {
                        p += 2;
                        uint32_t lo;
                        if (!hex4(lo)) return false;
                        if (lo >= 0xdc00 && lo <= 0xdfff) cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
                        else { utf8(s, cp); cp = lo; }
                    }
                    utf8(s, cp);
                    break;
                }
                default: return fail("bad JSON escape");
            }
        }
    }
    bool number(Value& out) {
        const char* start = p;
        bool is_float = false;
        if (p < end && *p == '-') p++;
        while (p < end && ((*p >= '0' && *p <= '9') || *p == '.' || *p == 'e' || *p == 'E' || *p == '+' || *p == '-')) {
            if (*p == '.' || *p == 'e' || *p == 'E') is_float = true;
            p++;
        }
        std::string text(start, p);
        if (text.empty() || text == "-") return fail("bad JSON number");
        if (is_float) {
            char* stop = nullptr;
            double d = std::strtod(text.c_str(), &stop);
            if (!stop || *stop) return fail("bad JSON number");
            out = Value::number(d);
            return true;
        }
        char* stop = nullptr;
        if (text[0] == '-') {
            long long v = std::strtoll(text.c_str(), &stop, 10);
            if (!stop || *stop) return fail("bad JSON integer");
            out = Value::integer(v);
        } else {
            unsigned long long v = std::strtoull(text.c_str(), &stop, 10);
            if (!stop || *stop) return fail("bad JSON integer");
            out = Value::uinteger(v);
        }
        return true;
    }
    bool value(Value& out, int depth) {
        if (depth > 256) return fail("JSON nested too deep");
        ws();
        if (p >= end) return fail("truncated JSON");
        char c = *p;
        if (c == '{') {
            p++;
            out = Value::map();
            ws();
            if (p < end && *p == '}') { p++; return true; }
            while (true) {
                ws();
                if (p >= end || *p != '"') return fail("a JSON object key must be a string");
                std::string k;
                if (!str(k)) return false;
                ws();
                if (p >= end || *p != ':') return fail("expected ':' in a JSON object");
                p++;
                Value v;
                if (!value(v, depth + 1)) return false;
                out.set(k, std::move(v));
                ws();
                if (p < end && *p == ',') { p++; continue; }
                if (p < end && *p == '}') { p++; return true; }
                return fail("expected ',' or '}' in a JSON object");
            }
        }
        if (c == '[') {
            p++;
            out = Value::array();
            ws();
            if (p < end && *p == ']') { p++; return true; }
            while (true) {
                Value v;
                if (!value(v, depth + 1)) return false;
                out.push(std::move(v));
                ws();
                if (p < end && *p == ',') { p++; continue; }
                if (p < end && *p == ']') { p++; return true; }
                return fail("expected ',' or ']' in a JSON array");
            }
        }
        if (c == '"') { std::string s; if (!str(s)) return false; out = Value::string(std::move(s)); return true; }
        if (c == 't') { out = Value::boolean(true); return lit("true"); }
        if (c == 'f') { out = Value::boolean(false); return lit("false"); }
        if (c == 'n') { out = Value::nil(); return lit("null"); }
        return number(out);
    }
};

void write_string(std::string& out, const std::string& s) {
    out += '"';
    for (unsigned char c : s) {
        switch (c) {
            case '"': out += "\\\""; break;
            case '\\': out += "\\\\"; break;
            case '\n': out += "\\n"; break;
            case '\r': out += "\\r"; break;
            case '\t': out += "\\t"; break;
            default:
                if (c < 0x20) {
                    char buf[8];
                    std::snprintf(buf, sizeof buf, "\\u%04x", c);
                    out += buf;
                } else {
                    out += static_cast<char>(c);
                }
        }
    }
    out += '"';
}

void write(std::string& out, const Value& v) {
    char buf[40];
    switch (v.type()) {
        case Value::Type::Nil: out += "null"; return;
        case Value::Type::Bool: out += v.as_bool() ? "true" : "false"; return;
        case Value::Type::Int: std::snprintf(buf, sizeof buf, "%lld", static_cast<long long>(v.as_int())); out += buf; return;
        case Value::Type::UInt: std::snprintf(buf, sizeof buf, "%llu", static_cast<unsigned long long>(v.as_uint())); out += buf; return;
        case Value::Type::Float: {
            double d = v.as_double();
            if (!std::isfinite(d)) { out += "null"; return; }
            std::snprintf(buf, sizeof buf, "%.17g", d);
            // the shortest text that reads back to the same double
            for (int prec = 1; prec <= 17; prec++) {
                char t[40];
                std::snprintf(t, sizeof t, "%.*g", prec, d);
                if (std::strtod(t, nullptr) == d) { std::memcpy(buf, t, sizeof t); break; }
            }
            out += buf;
            if (!std::strpbrk(buf, ".eE")) out += ".0";   // a float stays a float
            return;
        }
        case Value::Type::Str: case Value::Type::Bin: write_string(out, v.as_string()); return;
        case Value::Type::Array:
            out += '[';
            for (size_t i = 0; i < v.size(); i++) { if (i) out += ", "; write(out, v.at(i)); }
            out += ']';
            return;
        case Value::Type::Map:
            out += '{';
            for (size_t i = 0; i < v.size(); i++) {
                if (i) out += ", ";
                write_string(out, v.key_at(i));
                out += ": ";
                write(out, v.at(i));
            }
            out += '}';
            return;
    }
}

}  // namespace

bool parse(std::string_view text, Value& out, std::string* error) {
    Parser ps{text.data(), text.data() + text.size(), {}};
    Value v;
    bool ok = ps.value(v, 0);
    if (ok) {
        ps.ws();
        if (ps.p != ps.end) ok = ps.fail("trailing characters after the JSON value");
    }
    if (!ok) {
        if (error) *error = ps.err;
        return false;
    }
    out = std::move(v);
    return true;
}

std::string serialize(const Value& v) {
    std::string out;
    write(out, v);
    return out;
}

}  // namespace json
}  // namespace gllm
