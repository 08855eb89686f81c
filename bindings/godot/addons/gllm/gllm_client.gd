## A client of the gllm bridge (bindings/PROTOCOL.md) in pure GDScript, over [StreamPeerTCP]: ZMTP 3.1 + msgpack,
## a session with lease pings, reconnection with back-off, and every request ending with exactly one
## [signal completed] or [signal failed].
##
## There is no thread: call [method poll] once per frame (the [code]Gllm[/code] autoload or a [GllmNpc] does it
## from [code]_process[/code]). [method poll] reads what the socket has, answers ZMTP PINGs, sends the lease
## ping when nothing else was sent for [code]lease_ms / 3[/code], and emits the signals until its budget is spent;
## events left over wait for the next call.
##
## [b]Main-thread stalls.[/b] The lease is kept from [method poll]. A stall longer than the server's
## [code]lease_ms[/code] (default 5 s; a long scene load or shader compile) ends the session on the server: the
## next [method poll] finds it gone (a [code]no_session[/code] error or a closed connection), every request in
## flight ends with [signal failed] [code]"disconnected"[/code], [signal connection_changed] goes false, and the
## client says hello again by itself ([signal connection_changed] true). Send the player's line again then.
class_name GllmClient
extends RefCounted

## New text of a request, coalesced per request per poll; [param full] is the whole text so far.
signal text_received(id: String, delta: String, full: String)
## The request ended with a done ([code]finish_reason[/code] stop, length, cancelled or error): see
## [method done_info] for the keys of [param info].
signal completed(id: String, info: Dictionary)
## The request ended without a done: a server error code (bad_request, too_long, busy, ...) or
## [code]"disconnected"[/code] when the connection or the session was lost.
signal failed(id: String, code: String, message: String)
## True once welcomed, false when a welcomed session is lost.
signal connection_changed(connected: bool)
## Server errors that end no request (duplicate_id, unknown_op, unauthorized, ...); id is "" when none.
signal error_received(id: String, code: String, message: String)
## The answer to [method stats]: every counter the server sent.
signal stats_received(stats: Dictionary)
## The round trip of a [method ping], in milliseconds.
signal pong_received(rtt_ms: float)
## Per-token log-probabilities of a request that asked for them (each entry: token, logprob, top).
signal logprobs_received(id: String, entries: Array)
## The answer to [method snapshot]: the opaque blob for the save game, holding the KV
## of [param tokens] tokens.
signal snapshot_received(id: String, tokens: int, blob: PackedByteArray)
## The answer to [method restore]: [param tokens] tokens of KV are in the server's prefix cache again
## ([param new_blocks] KV blocks of them were not cached before).
signal restored(id: String, tokens: int, new_blocks: int)
## The answer to [method pin]: the pin's name (for [method unpin];
## the same prefix always gets the same name) and how many tokens stay resident.
signal pinned(id: String, pin_name: String, tokens: int)
## The answer to [method unpin]: whether the server had the pin.
signal unpinned(id: String, pin_name: String, found: bool)
## The answer to [method embed]: one unit-length [PackedFloat32Array] per input, in order.
signal embeddings_received(id: String, vectors: Array, prompt_tokens: int)

enum State { IDLE, CONNECTING, CONNECTED, RECONNECTING, CLOSED }
## The kinds of queued events (internal).
enum EventKind { TEXT, COMPLETED, FAILED, CONNECTION, ERROR, STATS, PONG, REPLY }

const PROTOCOL_VERSION := 1
const DISCONNECTED := "disconnected"
const MsgPack := preload("msgpack.gd")
const Zmtp := preload("zmtp.gd")
## The generate fields (§5.1) in the order the protocol's vectors list them; other keys go after them.
const GENERATE_KEYS: Array[String] = [
	"prompt",
	"messages",
	"max_tokens",
	"temperature",
	"top_k",
	"top_p",
	"min_p",
	"seed",
	"stop",
	"logprobs",
	"priority",
	"repetition_penalty",
	"presence_penalty",
	"frequency_penalty",
	"ignore_eos",
	"max_tokens_per_s",
	"ttft_deadline_ms",
	"json_schema",
	"regex",
	"grammar",
	"choice",
	"cache_result",
	"pin_prefix",
]
## Structured output (at most one): json_schema is a Dictionary or its JSON text; regex and grammar are text.
const TEXT_KEYS: Array[String] = ["regex", "grammar"]
const INT_KEYS: Array[String] = ["max_tokens", "top_k", "seed", "logprobs", "priority"]
const FLOAT_KEYS: Array[String] = [
	"temperature",
	"top_p",
	"min_p",
	"repetition_penalty",
	"presence_penalty",
	"frequency_penalty",
	"max_tokens_per_s",
	"ttft_deadline_ms",
]
## The frame time the server assumes when a report has no target_ms (60 fps).
const DEFAULT_TARGET_MS := 1000.0 / 60.0
## A frame over this many times its target counts as [code]over[/code] in a frame report (PROTOCOL.md §5).
const OVER_FACTOR := 1.1

## Sent in hello (logs only).
var client_name := "godot/0.1"
## The server's shared secret, when it requires one (--token); "" for none.
var token := ""
var connect_timeout_ms := 3000
## From TCP connect to welcome.
var handshake_timeout_ms := 5000
var auto_reconnect := true
## Back-off between connection attempts: doubles from min to max, plus up to 25 % jitter.
var reconnect_min_ms := 200
var reconnect_max_ms := 5000
## [method report_frame] sends one frame report per interval: the smoothed frame time, and the longest frame,
## the frame count and the count over 1.1 x target of the frames since the previous report.
var frame_report_interval_ms := 250
## Weight of the newest frame in the smoothed frame time.
var frame_smoothing := 0.2
## Lease pings. Turn off only to test the server dropping a silent session.
var send_keepalives := true
## Diagnostics ("" messages are never logged); print_verbose by default.
var log_callback := Callable()

var host := "127.0.0.1"
var port := 5555
## The session's welcome with defaults filled (v, model, server, max_seq_len, lease_ms, max_inflight,
## max_message_bytes); empty before the first one.
var welcome: Dictionary = {}
## Why the last connection attempt or session ended ("" while none).
var last_error := ""
## How many connection attempts were started after the first.
var reconnects := 0
## The last frame report sent by [method report_frame] (op, ms, target_ms, max_ms, frames, over), for an
## on-screen diagnostic; empty before the first one.
var last_frame_report: Dictionary = {}
## How many frame reports [method report_frame] has sent.
var frame_reports_sent := 0

var _state: State = State.IDLE
var _tcp: StreamPeerTCP = null
var _reader: Zmtp.Reader = null
var _got_ready := false
var _parts := PackedByteArray()
var _first_attempt := true
var _next_attempt_usec := 0
var _deadline_usec := 0
var _backoff_ms := 200
var _last_send_usec := 0
var _rng := RandomNumberGenerator.new()
var _inflight := {}  # id -> true for a generate (ends with done/error), false for another op: sent, no end yet
var _waiting: Array = []  # [id, payload, is a generate]: made before the welcome
var _open := {}  # id -> text dispatched so far, until its end is dispatched
var _carry: Array = []  # staged events, dispatched in order
var _carry_pos := 0
var _pending_text := {}  # id -> its staged, not yet dispatched text event
var _next_id := 0
var _frame_ema := -1.0
var _last_frame_sent_usec := 0
var _frame_max := 0.0  # the longest frame since the last report
var _frame_count := 0  # frames since the last report
var _frame_over := 0  # of those, the frames over OVER_FACTOR x target


## The connection state.
func get_state() -> State:
	return _state


## Whether the session is up (welcomed).
func is_connected_to_server() -> bool:
	return _state == State.CONNECTED


## Requests started with [method generate] (and NPC-memory ops) that have not ended on the wire (sent or waiting
## for the session).
func in_flight() -> int:
	return _inflight.size() + _waiting.size()


## Requests whose completed/failed has not been emitted yet.
func pending_requests() -> int:
	return _open.size()


## Starts connecting (the first attempt happens in the next [method poll]). Requests made before the welcome
## wait for it, and fail with "disconnected" if the attempt fails.
func connect_to_server(p_host: String = "127.0.0.1", p_port: int = 5555) -> void:
	if _state != State.IDLE or _tcp != null:
		push_error("GllmClient: connect_to_server was already called")
		return
	host = p_host
	port = p_port
	_state = State.CONNECTING
	_first_attempt = true
	_next_attempt_usec = Time.get_ticks_usec()
	_backoff_ms = reconnect_min_ms
	_rng.randomize()


## Starts a request; returns its id at once. [param options] holds the generate fields of PROTOCOL.md §5.1 by
## their wire names ("prompt" or "messages", "max_tokens", "temperature", "seed", ..., "max_tokens_per_s" to pace
## the reply, "ttft_deadline_ms" for a first-token deadline; "json_schema", "regex", "grammar" or "choice" for
## output that always parses), and optionally "id".
## Its text arrives as [signal text_received]; it ends with exactly one [signal completed] or [signal failed]
## (an invalid request, such as a seed above 2^63-1, fails with "bad_request" without reaching the server).
func generate(options: Dictionary) -> String:
	var id := ""
	if options.get("id") != null:
		id = str(options["id"])
	else:
		_next_id += 1
		id = "g%d" % _next_id
	if not _open.has(id):
		_open[id] = ""
	var built: Array = build_generate(id, options)
	if built[1] != "":
		_emit(EventKind.FAILED, id, "bad_request", built[1])
		return id
	_start(id, built[0], true)
	return id


## Sends a request (a generate or an NPC-memory op), or queues it for the welcome, or fails it at once.
func _start(id: String, payload: PackedByteArray, is_generate: bool) -> void:
	if _state == State.CONNECTED:
		_send_generate(id, payload, is_generate)
	elif _attempt_under_way():
		_waiting.append([id, payload, is_generate])
	else:
		var why := "not connected to the gllm server at %s:%d" % [host, port]
		if _state == State.CLOSED:
			why = "the client was closed"
		elif last_error != "":
			why += " (" + last_error + ")"
		_emit(EventKind.FAILED, id, DISCONNECTED, why)


## Asks the server to end a request; it then ends with [signal completed] (finish_reason "cancelled", or whatever
## it reached first). An id not in flight is ignored.
func cancel(id: String) -> void:
	for i in _waiting.size():
		if _waiting[i][0] == id:
			_waiting.remove_at(i)
			var info := {"id": id, "finish_reason": "cancelled", "text": ""}
			_emit(EventKind.COMPLETED, id, done_info(info))
			return
	if _state == State.CONNECTED and _inflight.has(id):
		_send_message(build_cancel(id))


## Prefills a chat (the shared system prompt and lore) into the server's prefix cache with a one-token greedy
## request; it ends like any request. Returns its id.
func warmup(messages: Array, priority: int = -1) -> String:
	return generate({"messages": messages, "max_tokens": 1, "temperature": 0.0, "priority": priority})


## The game's last frame time [param ms] against [param target_ms] (0: 60 fps), called once per frame. It keeps
## a smoothed frame time (the newest frame weighs [member frame_smoothing]), and counts the frames, the longest
## one and those over 1.1 x target; every [member frame_report_interval_ms] (the first at once) it sends one
## [code]frame[/code] report with them ([code]ms[/code] = the smoothed time) and starts the counts again. While
## not connected nothing is counted or sent.
func report_frame(ms: float, target_ms: float = 0.0) -> void:
	if is_nan(ms) or ms < 0.0:
		return
	if _state != State.CONNECTED:
		_reset_frame_counts()
		_last_frame_sent_usec = 0  # the first report of the next session goes at once
		return
	ms = minf(ms, 1e9)
	if is_nan(target_ms) or target_ms < 0.0:
		target_ms = 0.0
	target_ms = minf(target_ms, 1e9)
	_frame_ema = ms if _frame_ema < 0.0 else _frame_ema + frame_smoothing * (ms - _frame_ema)
	_frame_max = maxf(_frame_max, ms)
	_frame_count += 1
	if ms > OVER_FACTOR * (target_ms if target_ms > 0.0 else DEFAULT_TARGET_MS):
		_frame_over += 1
	var now := Time.get_ticks_usec()
	if (
		_last_frame_sent_usec != 0
		and now - _last_frame_sent_usec < frame_report_interval_ms * 1000
		and _frame_count < 1000000
	):
		return
	_last_frame_sent_usec = now
	last_frame_report = frame_message(_frame_ema, target_ms, _frame_max, _frame_count, _frame_over)
	frame_reports_sent += 1
	_reset_frame_counts()
	_send_message(MsgPack.encode(last_frame_report))


## Asks for the engine's counters; the answer comes as [signal stats_received] (dropped while not connected).
func stats() -> void:
	if _state == State.CONNECTED:
		_send_message(build_stats())


## Measures the round trip; the answer comes as [signal pong_received]. (Lease pings are automatic.)
func ping() -> void:
	if _state == State.CONNECTED:
		_send_message(build_ping(Time.get_ticks_usec()))


## The game will not need the device (the GPU or CPU it shares with the engine) for the next [param ms]
## milliseconds: call it at the end of each frame's work, if the game knows its frame's phases; the engine then
## steps only inside such windows (PROTOCOL.md §5.1 idle). Not answered; dropped while not connected; a negative
## or NaN [param ms] sends nothing.
func report_idle(ms: float) -> void:
	if _state == State.CONNECTED and not is_nan(ms) and ms >= 0.0:
		_send_message(build_idle(minf(ms, 1e9)))


# NPC memory (PROTOCOL.md §5.3). Each op returns its id at once and ends exactly once, like a generate: with its
# answer signal (snapshot_received, restored, pinned, unpinned, embeddings_received) or with [signal failed]
# (a server code such as bad_request, too_long, busy, or "disconnected"). Made while connecting, they wait for
# the welcome. Keep their ids ("": the client picks one) distinct from generate ids in flight.


## Exports the KV cache of a conversation for the save game: [param source] is the id (a String) of one of this
## client's generates that has ended, or token ids (an Array or packed array of ints). The blob comes as
## [signal snapshot_received]. [param encoding]: "" (raw) or "int8" (about half the size). A snapshot over the
## server's max_message_bytes fails with too_long.
func snapshot(source: Variant, encoding: String = "", id: String = "") -> String:
	var rid := _op_id(id)
	if source is String or source is StringName:
		return _op(rid, build_snapshot(rid, str(source), [], encoding))
	if _is_array(source):
		return _op(rid, build_snapshot(rid, "", Array(source), encoding))
	return _op(rid, [PackedByteArray(), "snapshot takes a conversation id (String) or token ids (an Array of ints)"])


## Loads a snapshot blob back into the server's prefix cache (answered by [signal restored]): the next generate
## whose prompt starts with its tokens skips their prefill. A blob of another model, or changed in any byte,
## fails with bad_request; one larger than the free KV, with too_long.
func restore(blob: PackedByteArray, id: String = "") -> String:
	var rid := _op_id(id)
	return _op(rid, build_restore(rid, blob))


## Keeps a prefix resident on the server, never evicted, until [method unpin]; answered by [signal pinned].
## [param what] is chat messages (an Array of {role, content}: rendered without a generation prompt; typically
## the shared system prompt and lore), a raw prompt (a String; BOS added, as in a generate), or token ids (an
## Array or packed array of ints).
func pin(what: Variant, id: String = "") -> String:
	var rid := _op_id(id)
	if what is String or what is StringName:
		return _op(rid, build_pin(rid, str(what), [], []))
	if _is_array(what):
		var items := Array(what)
		if not items.is_empty() and items[0] is Dictionary:
			return _op(rid, build_pin(rid, "", items, []))
		return _op(rid, build_pin(rid, "", [], items))
	return _op(rid, [PackedByteArray(), "pin takes messages (an Array of Dictionaries), a prompt or token ids"])


## Lets a pin's blocks be evicted again; answered by [signal unpinned] (whether the server had it).
func unpin(pin_name: String, id: String = "") -> String:
	var rid := _op_id(id)
	return _op(rid, build_unpin(rid, pin_name))


## Embeddings of 1 to 256 non-empty texts (an Array or PackedStringArray of Strings, or one String), for lore
## retrieval; answered by
## [signal embeddings_received] with one unit-length vector per text, in order. [param pooling]: "" (mean over
## the tokens) or "last".
func embed(inputs: Variant, pooling: String = "", id: String = "") -> String:
	var rid := _op_id(id)
	if inputs is String:
		inputs = [inputs]
	if not _is_array(inputs):
		return _op(rid, [PackedByteArray(), "embed takes an Array of Strings"])
	return _op(rid, build_embed(rid, Array(inputs), pooling))


static func _is_array(v: Variant) -> bool:
	return v is Array or v is PackedInt32Array or v is PackedInt64Array or v is PackedStringArray


func _op_id(id: String) -> String:
	if id.is_empty():
		_next_id += 1
		return "m%d" % _next_id
	return id


func _op(id: String, built: Array) -> String:
	if built[1] != "":
		_emit(EventKind.FAILED, id, "bad_request", built[1])
	else:
		_start(id, built[0], false)
	return id


## Once per frame: [method receive], then emits queued events until [param budget_usec] is spent (at least one
## when any is waiting; the rest wait for the next call). Returns how many events were emitted.
func poll(budget_usec: int = 1000) -> int:
	var start := Time.get_ticks_usec()
	receive()
	var n := 0
	while _carry_pos < _carry.size():
		if n > 0 and Time.get_ticks_usec() - start >= budget_usec:
			break
		var ev: Array = _carry[_carry_pos]
		_carry[_carry_pos] = null
		_carry_pos += 1
		if _carry_pos == _carry.size():
			_carry.clear()
			_carry_pos = 0
		n += 1
		_dispatch(ev)
	return n


## Services the connection without emitting anything: connects or reconnects when due, reads what the socket
## has (frames are parsed and their events queued), answers PINGs, sends the lease ping. [method poll] calls it.
func receive() -> void:
	if _state == State.CLOSED or _state == State.IDLE:
		return
	var now := Time.get_ticks_usec()
	if _tcp == null:
		if now >= _next_attempt_usec and (_first_attempt or auto_reconnect):
			if not _first_attempt:
				reconnects += 1
			_first_attempt = false
			_open_connection()
		return
	_tcp.poll()
	var status := _tcp.get_status()
	if _reader == null:  # the TCP connect is under way
		if status == StreamPeerTCP.STATUS_CONNECTING:
			if now > _deadline_usec:
				_lost("cannot connect to %s:%d: timed out after %d ms" % [host, port, connect_timeout_ms], false)
			return
		if status != StreamPeerTCP.STATUS_CONNECTED:
			_lost("cannot connect to %s:%d: connection refused" % [host, port], false)
			return
		_tcp.set_no_delay(true)
		_reader = Zmtp.Reader.new()
		_got_ready = false
		_parts = PackedByteArray()
		_deadline_usec = now + handshake_timeout_ms * 1000
		if not _write(Zmtp.client_opening()):
			return
	for _i in 64:
		if _tcp == null:
			return
		if _tcp.get_status() != StreamPeerTCP.STATUS_CONNECTED:
			break  # closed by the peer: Godot closes on FIN once nothing is left to read
		var avail := _tcp.get_available_bytes()
		if avail <= 0:
			break
		var got: Array = _tcp.get_partial_data(avail)
		if got[0] != OK:
			_lost("the connection failed while reading (error %d)" % got[0], false)
			return
		_reader.feed(got[1])
		_read_frames()
	if _tcp == null:
		return
	if _tcp.get_status() != StreamPeerTCP.STATUS_CONNECTED:
		_lost("the server closed the connection", false)
		return
	now = Time.get_ticks_usec()
	if _state == State.CONNECTING and now > _deadline_usec:
		_lost("no welcome within %d ms" % handshake_timeout_ms, false)
		return
	if _state == State.CONNECTED and send_keepalives:
		var lease: int = welcome.get("lease_ms", 5000)
		if now - _last_send_usec >= lease * 1000 / 3:
			_send_message(build_ping(null))


## Closes the connection. Requests in flight end with [signal failed] "disconnected" at the next [method poll].
func close() -> void:
	if _state == State.CLOSED:
		return
	var was_connected := _state == State.CONNECTED
	_close_socket()
	_fail_all("the client was closed")
	if was_connected:
		_emit(EventKind.CONNECTION, "", false)
	_state = State.CLOSED


# ------------------------------------------------------------------------------------------- messages


## The msgpack bytes of a generate, keys in the protocol's order: [code][bytes, error][/code] (error "" when
## valid). Checks what GDScript cannot send: a seed above 2^63-1 or below 0, non-integer integer fields.
static func build_generate(id: String, options: Dictionary) -> Array:
	var has_prompt := options.get("prompt") != null
	var has_messages := options.get("messages") != null
	if has_prompt == has_messages:
		return [PackedByteArray(), "give exactly one of prompt and messages"]
	if id.is_empty() or id.to_utf8_buffer().size() > 128:
		return [PackedByteArray(), "the request id must be 1 to 128 bytes"]
	var m := {"op": "generate", "id": id}
	for key in GENERATE_KEYS:
		var v: Variant = options.get(key)
		if v == null:
			continue
		if key == "seed":
			var why := _seed_problem(v)
			if why != "":
				return [PackedByteArray(), why]
		elif key in INT_KEYS and typeof(v) != TYPE_INT:
			return [PackedByteArray(), "%s must be an int, not %s" % [key, type_string(typeof(v))]]
		elif key in FLOAT_KEYS:
			if typeof(v) != TYPE_FLOAT and typeof(v) != TYPE_INT:
				return [PackedByteArray(), "%s must be a float, not %s" % [key, type_string(typeof(v))]]
			v = float(v)
		elif key == "messages":
			v = _messages(v)
		elif key in TEXT_KEYS and typeof(v) != TYPE_STRING:
			return [PackedByteArray(), "%s must be a String, not %s" % [key, type_string(typeof(v))]]
		elif key == "json_schema" and typeof(v) != TYPE_STRING and typeof(v) != TYPE_DICTIONARY:
			return [PackedByteArray(), "json_schema must be a Dictionary or JSON text"]
		m[key] = v
	for key: Variant in options:
		if key is String and key != "id" and key != "op" and not (key in GENERATE_KEYS):
			if options[key] != null:
				m[key] = options[key]
	var out := PackedByteArray()
	var err := MsgPack.write(out, m)
	return [out, err]


static func _seed_problem(v: Variant) -> String:
	if typeof(v) == TYPE_INT:
		if v < 0:
			return "seed %d is negative: seeds are 0 to 2^64-1" % v
		return ""
	var above := false
	if typeof(v) == TYPE_FLOAT:
		above = v >= 9223372036854775808.0
	elif typeof(v) == TYPE_STRING:
		var digits := (v as String).strip_edges().lstrip("0")
		if digits.is_valid_int() and not digits.begins_with("-") and not digits.begins_with("+"):
			above = (digits.length() > 19 or (digits.length() == 19 and digits > "9223372036854775807"))
	if above:
		return (
			(
				"seed %s is above 2^63-1: GDScript integers are signed 64-bit, so this client cannot send "
				+ "seeds from 2^63 to 2^64-1 (use a smaller seed)"
			)
			% str(v)
		)
	return "seed must be an int, not %s" % type_string(typeof(v))


static func _messages(v: Variant) -> Array:
	var out := []
	for e: Variant in v:
		if e is Dictionary:
			out.append({"role": str(e.get("role", "")), "content": str(e.get("content", ""))})
		else:
			out.append(e)
	return out


## A hello (vectors hello, hello-token).
static func build_hello(name: String, p_token: String = "", v: int = PROTOCOL_VERSION) -> PackedByteArray:
	var m := {"op": "hello", "v": v, "client": name}
	if p_token != "":
		m["token"] = p_token
	return MsgPack.encode(m)


## A cancel (vector cancel).
static func build_cancel(id: String) -> PackedByteArray:
	return MsgPack.encode({"op": "cancel", "id": id})


## A ping whose t is echoed back (vector ping; null for lease pings).
static func build_ping(t: Variant) -> PackedByteArray:
	return MsgPack.encode({"op": "ping", "t": t})


## A stats request (vector stats-request).
static func build_stats() -> PackedByteArray:
	return MsgPack.encode({"op": "stats"})


## An idle window (vector idle).
static func build_idle(ms: float) -> PackedByteArray:
	return MsgPack.encode({"op": "idle", "ms": float(ms)})


## A snapshot of a conversation ("" for none) or of token ids (vector snapshot-request): [code][bytes, error][/code].
static func build_snapshot(id: String, conversation: String, tokens: Array, encoding: String) -> Array:
	if conversation.is_empty() == tokens.is_empty():
		return [PackedByteArray(), "give exactly one of a conversation and tokens"]
	var m := {"op": "snapshot", "id": id}
	if not conversation.is_empty():
		m["conversation"] = conversation
	else:
		var why := _tokens_problem(tokens)
		if why != "":
			return [PackedByteArray(), why]
		m["tokens"] = tokens
	if not encoding.is_empty():
		m["encoding"] = encoding
	return _encoded(m)


## A restore of a snapshot blob (bin): [code][bytes, error][/code].
static func build_restore(id: String, blob: PackedByteArray) -> Array:
	if blob.is_empty():
		return [PackedByteArray(), "the blob is empty"]
	return _encoded({"op": "restore", "id": id, "blob": blob})


## A pin of exactly one of a prompt ("" for none), messages, token ids (vector pin): [code][bytes, error][/code].
static func build_pin(id: String, prompt: String, messages: Array, tokens: Array) -> Array:
	var given := int(not prompt.is_empty()) + int(not messages.is_empty()) + int(not tokens.is_empty())
	if given != 1:
		return [PackedByteArray(), "give exactly one of a prompt, messages and tokens"]
	var m := {"op": "pin", "id": id}
	if not prompt.is_empty():
		m["prompt"] = prompt
	elif not messages.is_empty():
		m["messages"] = _messages(messages)
	else:
		var why := _tokens_problem(tokens)
		if why != "":
			return [PackedByteArray(), why]
		m["tokens"] = tokens
	return _encoded(m)


## An unpin (vector unpin): [code][bytes, error][/code].
static func build_unpin(id: String, pin_name: String) -> Array:
	if pin_name.is_empty():
		return [PackedByteArray(), "the pin name is empty"]
	return _encoded({"op": "unpin", "id": id, "pin": pin_name})


## An embed of texts (vector embed): [code][bytes, error][/code]. [param pooling] "" is left out (mean).
static func build_embed(id: String, inputs: Array, pooling: String) -> Array:
	if inputs.is_empty():
		return [PackedByteArray(), "give 1 to 256 texts to embed"]
	for text: Variant in inputs:
		if not (text is String or text is StringName):
			return [PackedByteArray(), "embed inputs must be Strings, not %s" % type_string(typeof(text))]
	var m := {"op": "embed", "id": id, "input": inputs.map(func(x: Variant) -> String: return str(x))}
	if not pooling.is_empty():
		m["pooling"] = pooling
	return _encoded(m)


static func _tokens_problem(tokens: Array) -> String:
	for t: Variant in tokens:
		if typeof(t) != TYPE_INT:
			return "token ids must be ints, not %s" % type_string(typeof(t))
	return ""


static func _encoded(m: Dictionary) -> Array:
	if _s(m.get("id")).is_empty() or _s(m.get("id")).to_utf8_buffer().size() > 128:
		return [PackedByteArray(), "the request id must be 1 to 128 bytes"]
	var out := PackedByteArray()
	var err := MsgPack.write(out, m)
	return [out, err]


## A frame report (vector frame): [param ms] the (smoothed) frame time, [param max_ms] the longest frame,
## [param frames] the frames and [param over] those over 1.1 x target since the previous report. target_ms <= 0
## and negative max_ms, frames, over are left out.
static func build_frame(
	ms: float, target_ms: float, max_ms: float = -1.0, frames: int = -1, over: int = -1
) -> PackedByteArray:
	return MsgPack.encode(frame_message(ms, target_ms, max_ms, frames, over))


## The frame report [method build_frame] encodes, as a Dictionary in the protocol's key order (floats as
## float64, frames and over as integers).
static func frame_message(
	ms: float, target_ms: float, max_ms: float = -1.0, frames: int = -1, over: int = -1
) -> Dictionary:
	var m := {"op": "frame", "ms": ms}
	if target_ms > 0.0:
		m["target_ms"] = target_ms
	if max_ms >= 0.0:
		m["max_ms"] = max_ms
	if frames >= 0:
		m["frames"] = frames
	if over >= 0:
		m["over"] = over
	return m


## The typed view of a done message: id, finish_reason, text, prompt_tokens, completion_tokens, cached_tokens,
## ttft_ms (null when no token was produced), total_ms, ttft_deadline_met (true or false when the request had a
## ttft_deadline_ms, else null), error ("" unless finish_reason is "error"), raw.
static func done_info(m: Dictionary) -> Dictionary:
	var usage: Dictionary = m.get("usage") if m.get("usage") is Dictionary else {}
	var timings: Dictionary = m.get("timings") if m.get("timings") is Dictionary else {}
	var ttft: Variant = timings.get("ttft_ms")
	var met: Variant = timings.get("ttft_deadline_met")
	return {
		"id": _s(m.get("id")),
		"finish_reason": _s(m.get("finish_reason")),
		"text": _s(m.get("text")),
		"prompt_tokens": _i(usage.get("prompt_tokens")),
		"completion_tokens": _i(usage.get("completion_tokens")),
		"cached_tokens": _i(usage.get("cached_tokens")),
		"ttft_ms": float(ttft) if ttft is float or ttft is int else null,
		"total_ms": float(timings.get("total_ms", 0.0)) if timings.get("total_ms") != null else 0.0,
		"ttft_deadline_met": met if met is bool else null,
		"error": _s(m.get("error")),
		"raw": m,
	}


## The typed view of a welcome, defaults filled.
static func welcome_info(m: Dictionary) -> Dictionary:
	var w := {
		"v": _i(m.get("v"), 1),
		"model": _s(m.get("model")),
		"server": _s(m.get("server")),
		"max_seq_len": _i(m.get("max_seq_len")),
		"lease_ms": 5000,
		"max_inflight": 16,
		"max_message_bytes": 1 << 20,
		"raw": m,
	}
	for key: String in ["lease_ms", "max_inflight", "max_message_bytes"]:
		if m.get(key) is int and m[key] > 0:
			w[key] = m[key]
	return w


static func _s(v: Variant) -> String:
	return v if v is String else ""


static func _i(v: Variant, default: int = 0) -> int:
	return v if v is int else default


# ------------------------------------------------------------------------------------------- internals
func _attempt_under_way() -> bool:
	if _state == State.CONNECTING:
		return true
	return (
		_state == State.RECONNECTING and _tcp == null and auto_reconnect and Time.get_ticks_usec() >= _next_attempt_usec
	)


func _log(text: String) -> void:
	if log_callback.is_valid():
		log_callback.call(text)
	else:
		print_verbose(text)


func _emit(kind: EventKind, id: String, a: Variant = null, b: Variant = null) -> void:
	var ev := [kind, id, a, b]
	if kind == EventKind.TEXT:
		var pending: Variant = _pending_text.get(id)
		if pending != null:
			pending[2] += a
			if b != null:
				if pending[3] == null:
					pending[3] = b
				else:
					pending[3].append_array(b)
			return
		_pending_text[id] = ev
	elif kind == EventKind.COMPLETED or kind == EventKind.FAILED:
		_pending_text.erase(id)  # text after this end (an id reused at once) starts a new event
	_carry.append(ev)


func _dispatch(ev: Array) -> void:
	var id: String = ev[1]
	match ev[0]:
		EventKind.TEXT:
			if _pending_text.get(id) == ev:
				_pending_text.erase(id)
			if not _open.has(id):
				return
			if ev[3] != null:
				logprobs_received.emit(id, ev[3])
			var delta: String = ev[2]
			if delta.is_empty():
				return
			_open[id] += delta
			text_received.emit(id, delta, _open[id])
		EventKind.COMPLETED:
			_open.erase(id)
			completed.emit(id, ev[2])
		EventKind.FAILED:
			_open.erase(id)
			failed.emit(id, ev[2], ev[3])
		EventKind.CONNECTION:
			connection_changed.emit(ev[2])
		EventKind.ERROR:
			error_received.emit(id, ev[2], ev[3])
		EventKind.STATS:
			stats_received.emit(ev[2])
		EventKind.PONG:
			pong_received.emit(ev[2])
		EventKind.REPLY:
			_dispatch_reply(id, ev[2], ev[3])


func _dispatch_reply(id: String, op: String, m: Dictionary) -> void:
	match op:
		"snapshot":
			snapshot_received.emit(id, _i(m.get("tokens")), m["blob"])
		"restored":
			restored.emit(id, _i(m.get("tokens")), _i(m.get("new_blocks")))
		"pinned":
			pinned.emit(id, _s(m.get("pin")), _i(m.get("tokens")))
		"unpinned":
			unpinned.emit(id, _s(m.get("pin")), m.get("found") == true)
		"embeddings":
			embeddings_received.emit(id, embedding_vectors(m), _i(m.get("prompt_tokens")))


## The vectors of an embeddings message, each a [PackedFloat32Array].
static func embedding_vectors(m: Dictionary) -> Array:
	var out := []
	var vectors: Variant = m.get("vectors")
	if vectors is Array:
		for v: Variant in vectors:
			out.append(PackedFloat32Array(v) if v is Array else PackedFloat32Array())
	return out


func _open_connection() -> void:
	_state = State.CONNECTING
	_tcp = StreamPeerTCP.new()
	_reader = null
	_deadline_usec = Time.get_ticks_usec() + connect_timeout_ms * 1000
	var err := _tcp.connect_to_host(host, port)
	if err != OK:
		_lost("cannot connect to %s:%d: %s" % [host, port, error_string(err)], false)


func _read_frames() -> void:
	while _tcp != null:
		var fr: Array = _reader.next_frame()
		if fr.is_empty():
			if _reader.error != "":
				_lost(_reader.error, false)
			return
		var flags: int = fr[0]
		var body: PackedByteArray = fr[1]
		if (flags & Zmtp.FLAG_COMMAND) != 0:
			_on_command(body)
			continue
		if not _got_ready:
			_lost("a message arrived before the server's READY", false)
			return
		if (flags & Zmtp.FLAG_MORE) != 0:
			_parts.append_array(body)
			continue
		if not _parts.is_empty():
			_parts.append_array(body)
			body = _parts
			_parts = PackedByteArray()
		var dec: Array = MsgPack.decode(body)
		if dec[1] != "" or not (dec[0] is Dictionary):
			_log("gllm: ignoring an undecodable message: " + str(dec[1]))
			continue
		_on_message(dec[0])


func _on_command(body: PackedByteArray) -> void:
	var cn: Array = Zmtp.command_name(body)
	var name: String = cn[0]
	var data: int = cn[1]
	if name == "READY":
		if _got_ready:
			return
		var props: Variant = Zmtp.parse_properties(body, data)
		if props == null:
			_lost("a malformed READY from the server", false)
			return
		var kind: String = (props as Dictionary).get("Socket-Type", PackedByteArray()).get_string_from_ascii()
		if kind != "ROUTER":
			_lost("the server's socket is a %s, not a ROUTER" % kind, false)
			return
		_got_ready = true
		_send_message(build_hello(client_name, token))
	elif name == "ERROR":
		var reason := ""
		if body.size() > data:
			reason = body.slice(data + 1, data + 1 + body[data]).get_string_from_ascii()
		_lost("the server refused the connection: " + reason, false)
	elif name == "PING" and _got_ready:
		var ctx := body.slice(mini(data + 2, body.size()), mini(data + 18, body.size()))
		_write(Zmtp.pong(ctx))
	# PONG and unknown commands: ignored


func _on_message(m: Dictionary) -> void:
	match m.get("op"):
		"welcome":
			var w := welcome_info(m)
			if w["v"] != PROTOCOL_VERSION:
				_lost("the server speaks protocol v%d; this client speaks v1" % w["v"], false)
				return
			welcome = w
			if _state == State.CONNECTED:
				return  # a repeated welcome
			_state = State.CONNECTED
			_backoff_ms = reconnect_min_ms
			last_error = ""
			_emit(EventKind.CONNECTION, "", true)
			var waiting := _waiting
			_waiting = []
			for item: Array in waiting:
				if _state != State.CONNECTED:
					_waiting.append(item)
				else:
					_send_generate(item[0], item[1], item[2])
		"tokens":
			var items: Variant = m.get("items")
			if not (items is Array):
				return
			for it: Variant in items:
				if not (it is Dictionary):
					continue
				var id: Variant = it.get("id")
				if not (id is String) or not _inflight.has(id):
					continue
				var text: String = _s(it.get("text"))
				var lps: Variant = it.get("logprobs")
				if not (lps is Array):
					lps = null
				if text.is_empty() and lps == null:
					continue
				_emit(EventKind.TEXT, id, text, lps)
		"done":
			var id: Variant = m.get("id")
			if id is String and _inflight.has(id):
				_inflight.erase(id)
				_emit(EventKind.COMPLETED, id, done_info(m))
		"error":
			var id: String = _s(m.get("id"))
			var code: String = _s(m.get("code"))
			if code.is_empty():
				code = "bad_request"
			var message: String = _s(m.get("message"))
			if code == "no_session":  # the server dropped this session (lease, backlog): all in flight is gone
				_lost("the server ended the session: " + message, true)
				return
			if id != "" and code != "duplicate_id" and _inflight.has(id):
				_inflight.erase(id)
				_emit(EventKind.FAILED, id, code, message)
				return
			_emit(EventKind.ERROR, id, code, message)
			if _state == State.CONNECTING and id == "":  # hello refused
				_lost("the server refused the session: %s: %s" % [code, message], false)
		"pong":
			var t: Variant = m.get("t")
			if t is int:
				_emit(EventKind.PONG, "", (Time.get_ticks_usec() - t) / 1000.0)
		"stats":
			_emit(EventKind.STATS, "", m)
		"snapshot", "restored", "pinned", "unpinned", "embeddings":
			var id: Variant = m.get("id")
			if not (id is String) or _inflight.get(id, true):  # not in flight, or a generate (ends with done/error)
				return
			_inflight.erase(id)
			if m.get("op") == "snapshot" and not (m.get("blob") is PackedByteArray):
				_emit(EventKind.FAILED, id, "bad_request", "the snapshot reply carries no bin blob")
				return
			_emit(EventKind.REPLY, id, m.get("op"), m)
		# unknown ops: ignored (§4.3)


func _send_generate(id: String, payload: PackedByteArray, is_generate: bool) -> void:
	var limit: int = welcome.get("max_message_bytes", 1 << 20)
	if payload.size() > limit:
		if not _inflight.has(id):
			var why := "the request is %d bytes; the server accepts at most %d" % [payload.size(), limit]
			_emit(EventKind.FAILED, id, "too_long", why)
		return
	if not _inflight.has(id):  # a duplicate id: the server answers duplicate_id; it has no end of its own
		_inflight[id] = is_generate
	_send_message(payload)


func _send_message(payload: PackedByteArray) -> void:
	if _write(Zmtp.message_frame(payload)):
		_last_send_usec = Time.get_ticks_usec()


func _write(bytes: PackedByteArray) -> bool:
	if _tcp == null:
		return false
	var err := _tcp.put_data(bytes)
	if err != OK:
		_lost("the connection failed while sending (%s)" % error_string(err), false)
		return false
	return true


## The connection or session is gone: close it, end every request in flight with one failed "disconnected",
## and schedule the next attempt (at once after a dropped session, else with back-off).
func _lost(why: String, retry_now: bool) -> void:
	_close_socket()
	var was_connected := _state == State.CONNECTED
	last_error = why
	_log("gllm: " + why)
	_fail_all(why)
	if was_connected:
		_emit(EventKind.CONNECTION, "", false)
	_state = State.RECONNECTING
	var delay := 0
	if not retry_now:
		delay = _backoff_ms + _rng.randi_range(0, _backoff_ms / 4)
		_backoff_ms = mini(reconnect_max_ms, maxi(1, _backoff_ms * 2))
	_next_attempt_usec = Time.get_ticks_usec() + delay * 1000
	if not auto_reconnect:
		_state = State.IDLE


func _fail_all(why: String) -> void:
	for id: String in _inflight:
		_emit(EventKind.FAILED, id, DISCONNECTED, why)
	_inflight.clear()
	for item: Array in _waiting:
		_emit(EventKind.FAILED, item[0], DISCONNECTED, why)
	_waiting.clear()


func _reset_frame_counts() -> void:
	_frame_max = 0.0
	_frame_count = 0
	_frame_over = 0


func _close_socket() -> void:
	if _tcp != null:
		_tcp.disconnect_from_host()
	_tcp = null
	_reader = null
	_got_ready = false
	_parts = PackedByteArray()
