## ZMTP 3.1 for a DEALER with the NULL mechanism (bindings/PROTOCOL.md §2): the greeting, READY, short and long
## frames, PING -> PONG, ERROR. Pure byte handling: the socket lives in [GllmClient].
class_name GllmZmtp
extends RefCounted

const GREETING_SIZE := 64
const FLAG_MORE := 0x01
const FLAG_LONG := 0x02
const FLAG_COMMAND := 0x04
## Frames above this size are refused (the server's own limit, max_message_bytes, is far below it).
const MAX_FRAME_BYTES := 64 * 1024 * 1024


## The 64-byte greeting (vector zmtp-greeting): signature, version 3.1, mechanism NULL.
static func greeting() -> PackedByteArray:
	var g := PackedByteArray()
	g.resize(GREETING_SIZE)
	g.fill(0)
	g[0] = 0xff
	g[8] = 0x01
	g[9] = 0x7f
	g[10] = 3
	g[11] = 1
	var mech := "NULL".to_ascii_buffer()
	for i in mech.size():
		g[12 + i] = mech[i]
	return g


## A READY command frame with Socket-Type and an empty Identity (vector zmtp-ready-dealer).
static func ready(socket_type: String) -> PackedByteArray:
	var body := PackedByteArray()
	_short_string(body, "READY")
	_property(body, "Socket-Type", socket_type.to_ascii_buffer())
	_property(body, "Identity", PackedByteArray())
	return frame(body, FLAG_COMMAND)


## What a client writes first, in one write (vector zmtp-client-opening).
static func client_opening() -> PackedByteArray:
	var b := greeting()
	b.append_array(ready("DEALER"))
	return b


## A PONG command echoing a PING's context (vector zmtp-pong for an empty context).
static func pong(context: PackedByteArray) -> PackedByteArray:
	var body := PackedByteArray()
	_short_string(body, "PONG")
	body.append_array(context)
	return frame(body, FLAG_COMMAND)


## A frame header: the short form for 0-255 bytes, the long form (8-byte size) above (§2.2).
static func header(flags: int, size: int) -> PackedByteArray:
	var h := PackedByteArray()
	if size <= 255:
		h.append(flags & ~FLAG_LONG)
		h.append(size)
	else:
		h.append(flags | FLAG_LONG)
		for i in range(7, -1, -1):
			h.append((size >> (8 * i)) & 0xff)
	return h


## A whole frame: header and body.
static func frame(body: PackedByteArray, flags: int = 0) -> PackedByteArray:
	var f := header(flags, body.size())
	f.append_array(body)
	return f


## A message frame carrying one msgpack message (flags 00, or 02 when long).
static func message_frame(payload: PackedByteArray) -> PackedByteArray:
	return frame(payload, 0)


## "" when the peer's greeting is acceptable (§2.1), else why not.
static func check_greeting(g: PackedByteArray, offset: int = 0) -> String:
	return Reader.check_greeting(g, offset)


## A command frame's name and where its data starts: [code][name, data_offset][/code] ("" when malformed).
static func command_name(body: PackedByteArray) -> Array:
	if body.size() < 1 or body[0] + 1 > body.size():
		return ["", body.size()]
	return [body.slice(1, 1 + body[0]).get_string_from_ascii(), 1 + body[0]]


## The properties of a READY command's data (name -> value bytes); null when malformed.
static func parse_properties(body: PackedByteArray, offset: int) -> Variant:
	var props := {}
	var p := offset
	while p < body.size():
		var n: int = body[p]
		if p + 1 + n + 4 > body.size():
			return null
		var name := body.slice(p + 1, p + 1 + n).get_string_from_ascii()
		p += 1 + n
		var size := (body[p] << 24) | (body[p + 1] << 16) | (body[p + 2] << 8) | body[p + 3]
		p += 4
		if p + size > body.size():
			return null
		props[name] = body.slice(p, p + size)
		p += size
	return props


static func _short_string(dst: PackedByteArray, s: String) -> void:
	var b := s.to_ascii_buffer()
	dst.append(b.size())
	dst.append_array(b)


static func _property(dst: PackedByteArray, name: String, value: PackedByteArray) -> void:
	_short_string(dst, name)
	var n := value.size()
	dst.append_array(PackedByteArray([(n >> 24) & 0xff, (n >> 16) & 0xff, (n >> 8) & 0xff, n & 0xff]))
	dst.append_array(value)


## Splits the bytes a peer sends into its greeting and frames, keeping partial input between reads.
class Reader:
	## Whether the peer's 64-byte greeting was read (and accepted).
	var greeting_done := false
	## The first protocol violation met ("" while none); once set, the reader returns no more frames.
	var error := ""
	var _buf := PackedByteArray()
	var _pos := 0

	## "" when the peer's greeting is acceptable (§2.1), else why not.
	static func check_greeting(g: PackedByteArray, offset: int = 0) -> String:
		if g.size() - offset < GREETING_SIZE:
			return "a short greeting"
		if g[offset] != 0xff or (g[offset + 9] & 0x01) == 0:
			return "the peer does not speak ZMTP (bad signature)"
		if g[offset + 10] < 3:
			return "the peer speaks ZMTP %d, not 3" % g[offset + 10]
		var mech := g.slice(offset + 12, offset + 32)
		var end := mech.find(0)
		var name := mech.slice(0, end if end >= 0 else mech.size()).get_string_from_ascii()
		if name != "NULL":
			return (
				(
					"the server uses the %s security mechanism; this client speaks only NULL "
					+ "(a CURVE server needs a libzmq client)"
				)
				% name
			)
		return ""

	## Appends received bytes.
	func feed(bytes: PackedByteArray) -> void:
		if _pos > 0 and _pos >= _buf.size():
			_buf = PackedByteArray()
			_pos = 0
		elif _pos > 65536 and _pos * 2 > _buf.size():
			_buf = _buf.slice(_pos)
			_pos = 0
		_buf.append_array(bytes)

	## Bytes received and not yet consumed.
	func buffered() -> int:
		return _buf.size() - _pos

	## The next complete frame as [code][flags, body][/code], or an empty array when more bytes are needed (or
	## [member error] is set). The greeting is consumed and checked first.
	func next_frame() -> Array:
		if error != "":
			return []
		if not greeting_done:
			if buffered() < GREETING_SIZE:
				return []
			var why := check_greeting(_buf, _pos)
			if why != "":
				error = why
				return []
			_pos += GREETING_SIZE
			greeting_done = true
		var left := buffered()
		if left < 2:
			return []
		var flags: int = _buf[_pos]
		if (flags & 0xf8) != 0:
			error = "a frame with reserved flag bits set (0x%02x)" % flags
			return []
		var head := 2
		var size: int = _buf[_pos + 1]
		if (flags & FLAG_LONG) != 0:
			head = 9
			if left < 9:
				return []
			size = 0
			for i in 8:
				size = (size << 8) | _buf[_pos + 1 + i]
			if size < 0 or size > MAX_FRAME_BYTES:
				error = "a frame of %d bytes" % size
				return []
		if left < head + size:
			return []
		var body := _buf.slice(_pos + head, _pos + head + size)
		_pos += head + size
		return [flags, body]
