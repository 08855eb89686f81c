// A msgpack / JSON value (bindings/PROTOCOL.md §3): nil, bool, int (int64, or uint64 above INT64_MAX), float64,
// str, bin, array, and maps with string keys that keep their wire order. The msgpack codec decodes every form
// §3 allows and encodes the canonical shortest form of the §9 vectors; the JSON codec reads the conformance spec
// and writes save games. No exceptions: decoders return false and say why.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace gllm {

class Value {
public:
    enum class Type : uint8_t { Nil, Bool, Int, UInt, Float, Str, Bin, Array, Map };

    Value() = default;
    static Value nil() { return Value(); }
    static Value boolean(bool b);
    static Value integer(int64_t v);
    static Value uinteger(uint64_t v);   // stored as Int when it fits: an int is an int, whatever its width
    static Value number(double v);
    static Value string(std::string s);
    static Value binary(std::string bytes);
    static Value array();
    static Value map();

    Type type() const { return type_; }
    bool is_nil() const { return type_ == Type::Nil; }
    bool is_bool() const { return type_ == Type::Bool; }
    bool is_int() const { return type_ == Type::Int || type_ == Type::UInt; }
    bool is_float() const { return type_ == Type::Float; }
    bool is_string() const { return type_ == Type::Str; }
    bool is_array() const { return type_ == Type::Array; }
    bool is_map() const { return type_ == Type::Map; }

    bool as_bool() const { return b_; }
    int64_t as_int() const { return i_; }        // Int; a UInt reads as its two's complement
    uint64_t as_uint() const { return static_cast<uint64_t>(i_); }
    double as_double() const;                     // Float, or an integer converted
    const std::string& as_string() const { return s_; }

    // arrays and maps: size() entries; a map's entries are key_at(i) -> at(i), in wire order
    size_t size() const { return items_.size(); }
    const Value& at(size_t i) const { return items_[i]; }
    Value& at(size_t i) { return items_[i]; }
    const std::string& key_at(size_t i) const { return keys_[i]; }
    void push(Value v) { items_.push_back(std::move(v)); }
    Value& set(std::string_view key, Value v);   // adds, or replaces the value of an existing key
    const Value* find(std::string_view key) const;   // nullptr when absent
    bool remove(std::string_view key);
    void reserve(size_t n);

    // typed field access on maps; nil and absent read the same (std::nullopt / nullptr)
    const std::string* get_string(std::string_view key) const;
    std::optional<int64_t> get_int(std::string_view key) const;
    std::optional<double> get_double(std::string_view key) const;   // integers accepted, as the server does
    std::optional<bool> get_bool(std::string_view key) const;
    const Value* get_map(std::string_view key) const;
    const Value* get_array(std::string_view key) const;

    // Deep equality, types included (an int is not a float); map key order matters only when ordered_keys.
    bool equals(const Value& other, bool ordered_keys = false) const;

private:
    Type type_ = Type::Nil;
    bool b_ = false;
    int64_t i_ = 0;
    double d_ = 0.0;
    std::string s_;
    std::vector<Value> items_;
    std::vector<std::string> keys_;
};

// ---------------------------------------------------------------------------------------------- msgpack
namespace msgpack {

constexpr int kMaxDepth = 64;

// Decodes exactly one value filling [data, data+size) (trailing bytes are an error). Keys must be strings; ext
// types and c1 are refused. Never allocates more than the input can describe.
bool decode(const uint8_t* data, size_t size, Value& out, std::string* error = nullptr);

class Writer {
public:
    explicit Writer(std::vector<uint8_t>* out) : out_(out) {}
    void nil();
    void boolean(bool v);
    void integer(int64_t v);     // shortest form: positive fixint, uint8..64 for >= 0; negative fixint, int8..64
    void uinteger(uint64_t v);
    void float64(double v);      // always cb + 8 bytes
    void str(std::string_view s);   // fixstr, str8, str16, str32
    void bin(std::string_view b);
    void array_header(size_t n);
    void map_header(size_t n);
    void value(const Value& v);
private:
    void be(uint64_t v, int bytes);
    std::vector<uint8_t>* out_;
};

std::vector<uint8_t> encode(const Value& v);

}  // namespace msgpack

// ---------------------------------------------------------------------------------------------- JSON
namespace json {

// JSON numbers with a '.', 'e' or 'E' are floats, others ints (uint64 above INT64_MAX kept); \u escapes and
// surrogate pairs become UTF-8.
bool parse(std::string_view text, Value& out, std::string* error = nullptr);
std::string serialize(const Value& v);   // bin is written as a string of its bytes

}  // namespace json

}  // namespace gllm
