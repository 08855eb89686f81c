## The msgpack subset of the gllm bridge protocol (bindings/PROTOCOL.md §3), in pure GDScript.
##
## [method encode] writes the canonical form the protocol's test vectors show: integers and strings in their
## shortest header, every float as float64, dictionaries in their insertion order (string keys only).
## [method decode] accepts every encoding of §3 and returns [code][value, error][/code]: [code]error[/code] is
## [code]""[/code] on success. GDScript integers are signed 64-bit: a uint64 above 2^63-1 decodes to a float.
## bin (the snapshot blob of §5.3) is a [PackedByteArray] both ways.
class_name GllmMsgPack
extends RefCounted

const MAX_DEPTH := 64


## The msgpack bytes of a value: null, bool, int, float, String/StringName, Array (or a packed array),
## Dictionary with String keys, PackedByteArray (bin). Returns an empty array and pushes an error for anything else.
static func encode(value: Variant) -> PackedByteArray:
	var out := PackedByteArray()
	var err := write(out, value)
	if err != "":
		push_error("GllmMsgPack.encode: " + err)
		return PackedByteArray()
	return out


## Appends the encoding of [param value] to [param out]; returns "" or what could not be encoded.
static func write(out: PackedByteArray, value: Variant, depth: int = 0) -> String:
	if depth > MAX_DEPTH:
		return "nested too deeply"
	match typeof(value):
		TYPE_NIL:
			out.append(0xc0)
		TYPE_BOOL:
			out.append(0xc3 if value else 0xc2)
		TYPE_INT:
			write_int(out, value)
		TYPE_FLOAT:
			write_float(out, value)
		TYPE_STRING, TYPE_STRING_NAME:
			write_string(out, str(value))
		TYPE_DICTIONARY:
			var d: Dictionary = value
			write_map_header(out, d.size())
			for key: Variant in d:
				if typeof(key) != TYPE_STRING and typeof(key) != TYPE_STRING_NAME:
					return "a map key is not a string: %s" % [key]
				write_string(out, str(key))
				var err := write(out, d[key], depth + 1)
				if err != "":
					return err
		TYPE_PACKED_BYTE_ARRAY:
			write_bin(out, value)
		TYPE_ARRAY, TYPE_PACKED_STRING_ARRAY, TYPE_PACKED_INT64_ARRAY, TYPE_PACKED_FLOAT64_ARRAY:
			var items: Array = Array(value)
			write_array_header(out, items.size())
			for item: Variant in items:
				var err := write(out, item, depth + 1)
				if err != "":
					return err
		_:
			return "cannot encode a %s" % type_string(typeof(value))
	return ""


static func write_int(out: PackedByteArray, v: int) -> void:
	if v >= 0:
		if v < 0x80:
			out.append(v)
		elif v < 0x100:
			out.append(0xcc)
			out.append(v)
		elif v < 0x10000:
			out.append(0xcd)
			_be(out, v, 2)
		elif v < 0x100000000:
			out.append(0xce)
			_be(out, v, 4)
		else:
			out.append(0xcf)
			_be(out, v, 8)
	elif v >= -32:
		out.append(v & 0xff)
	elif v >= -128:
		out.append(0xd0)
		_be(out, v, 1)
	elif v >= -32768:
		out.append(0xd1)
		_be(out, v, 2)
	elif v >= -2147483648:
		out.append(0xd2)
		_be(out, v, 4)
	else:
		out.append(0xd3)
		_be(out, v, 8)


static func write_float(out: PackedByteArray, v: float) -> void:
	var tmp := PackedByteArray()
	tmp.resize(8)
	tmp.encode_double(0, v)
	out.append(0xcb)
	for i in range(7, -1, -1):
		out.append(tmp[i])


static func write_string(out: PackedByteArray, s: String) -> void:
	var b := s.to_utf8_buffer()
	var n := b.size()
	if n < 32:
		out.append(0xa0 | n)
	elif n < 0x100:
		out.append(0xd9)
		out.append(n)
	elif n < 0x10000:
		out.append(0xda)
		_be(out, n, 2)
	else:
		out.append(0xdb)
		_be(out, n, 4)
	out.append_array(b)


## bin 8/16/32: the header in the shortest form, then the bytes.
static func write_bin(out: PackedByteArray, b: PackedByteArray) -> void:
	var n := b.size()
	if n <= 0xff:
		out.append(0xc4)
		_be(out, n, 1)
	elif n <= 0xffff:
		out.append(0xc5)
		_be(out, n, 2)
	else:
		out.append(0xc6)
		_be(out, n, 4)
	out.append_array(b)


static func write_array_header(out: PackedByteArray, n: int) -> void:
	if n < 16:
		out.append(0x90 | n)
	elif n < 0x10000:
		out.append(0xdc)
		_be(out, n, 2)
	else:
		out.append(0xdd)
		_be(out, n, 4)


static func write_map_header(out: PackedByteArray, n: int) -> void:
	if n < 16:
		out.append(0x80 | n)
	elif n < 0x10000:
		out.append(0xde)
		_be(out, n, 2)
	else:
		out.append(0xdf)
		_be(out, n, 4)


static func _be(out: PackedByteArray, v: int, size: int) -> void:
	for i in range(size - 1, -1, -1):
		out.append((v >> (8 * i)) & 0xff)


## Decodes exactly one value filling [param bytes] from [param offset] ([param length] bytes; -1: to the end).
## Returns [code][value, error][/code] with error "" on success.
static func decode(bytes: PackedByteArray, offset: int = 0, length: int = -1) -> Array:
	var r := Reader.new(bytes, offset, offset + (bytes.size() - offset if length < 0 else length))
	var v: Variant = r.value(0)
	if r.error == "" and r.pos != r.end:
		r.error = "%d trailing bytes after the value" % (r.end - r.pos)
	if r.error != "":
		return [null, r.error]
	return [v, ""]


## A cursor over msgpack bytes; the first problem met is kept in [member error].
class Reader:
	var data: PackedByteArray
	var pos: int
	var end: int
	var error := ""

	func _init(bytes: PackedByteArray, start: int, stop: int) -> void:
		data = bytes
		pos = start
		end = mini(stop, bytes.size())

	func _fail(why: String) -> Variant:
		if error == "":
			error = why + " at byte %d" % pos
		pos = end
		return null

	func _need(n: int) -> bool:
		if n < 0 or end - pos < n:
			_fail("truncated: %d more bytes needed" % n)
			return false
		return true

	func _uint(n: int) -> int:
		var v := 0
		for i in n:
			v = (v << 8) | data[pos + i]
		pos += n
		return v

	func _sint(n: int) -> int:
		var v := _uint(n)
		if n < 8 and v >= (1 << (8 * n - 1)):
			v -= 1 << (8 * n)
		return v

	func _count(n: int) -> int:
		if not _need(n):
			return -1
		var c := _uint(n)
		if c < 0 or c > end - pos:
			_fail("a length of %d exceeds the %d bytes left" % [c, end - pos])
			return -1
		return c

	func _str(n: int) -> Variant:
		if n < 0 or not _need(n):
			return null
		var s := data.slice(pos, pos + n).get_string_from_utf8()
		pos += n
		return s

	func _bin(n: int) -> Variant:
		if n < 0 or not _need(n):
			return null
		var b := data.slice(pos, pos + n)
		pos += n
		return b

	func _float(n: int) -> Variant:
		if not _need(n):
			return null
		var tmp := PackedByteArray()
		tmp.resize(n)
		for i in n:
			tmp[i] = data[pos + n - 1 - i]
		pos += n
		return tmp.decode_double(0) if n == 8 else tmp.decode_float(0)

	func _array(n: int, depth: int) -> Variant:
		if n < 0:
			return null
		var a := []
		a.resize(n)
		for i in n:
			a[i] = value(depth + 1)
			if error != "":
				return null
		return a

	func _map(n: int, depth: int) -> Variant:
		if n < 0:
			return null
		var d := {}
		for i in n:
			var k: Variant = value(depth + 1)
			if error != "":
				return null
			if typeof(k) != TYPE_STRING:
				return _fail("a map key is not a string")
			d[k] = value(depth + 1)
			if error != "":
				return null
		return d

	func value(depth: int) -> Variant:
		if depth > MAX_DEPTH:
			return _fail("nested too deeply")
		if not _need(1):
			return null
		var b: int = data[pos]
		pos += 1
		if b < 0x80:
			return b
		if b >= 0xe0:
			return b - 0x100
		if b >= 0xa0 and b <= 0xbf:
			return _str(b & 0x1f)
		if b >= 0x90 and b <= 0x9f:
			return _array(b & 0x0f, depth)
		if b >= 0x80 and b <= 0x8f:
			return _map(b & 0x0f, depth)
		match b:
			0xc0:
				return null
			0xc2:
				return false
			0xc3:
				return true
			0xcc, 0xcd, 0xce:
				var n: int = 1 << (b - 0xcc)
				return _uint(n) if _need(n) else null
			0xcf:
				if not _need(8):
					return null
				var hi := _uint(4)
				var lo := _uint(4)
				if hi >= 0x80000000:
					return float(hi) * 4294967296.0 + float(lo)  # above 2^63-1: no GDScript int holds it
				return (hi << 32) | lo
			0xd0, 0xd1, 0xd2, 0xd3:
				var n: int = 1 << (b - 0xd0)
				return _sint(n) if _need(n) else null
			0xc4:
				return _bin(_count(1))
			0xc5:
				return _bin(_count(2))
			0xc6:
				return _bin(_count(4))
			0xca:
				return _float(4)
			0xcb:
				return _float(8)
			0xd9:
				return _str(_count(1))
			0xda:
				return _str(_count(2))
			0xdb:
				return _str(_count(4))
			0xdc:
				return _array(_count(2), depth)
			0xdd:
				return _array(_count(4), depth)
			0xde:
				return _map(_count(2), depth)
			0xdf:
				return _map(_count(4), depth)
		return _fail("unsupported msgpack byte 0x%02x" % b)
