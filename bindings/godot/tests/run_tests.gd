## The GDScript runner of the cross-client conformance scenarios (tests/clients/scenarios.json), against a real
## `gllm serve`. Run by tests/test_client_godot.py through tests/clients/harness.py:
##     godot --headless --path PROJECT --script res://tests/run_tests.gd -- --spec SPEC.json [--only a,b]
## Prints `PASS name` / `FAIL name: why` per scenario, `METRIC name k=v ...`, and `N passed, N failed`; exits 1
## when any scenario failed.
extends SceneTree

const GllmClientScript := preload("res://addons/gllm/gllm_client.gd")
const Conversation := preload("res://addons/gllm/gllm_npc_conversation.gd")
const MsgPack := preload("res://addons/gllm/msgpack.gd")
const Zmtp := preload("res://addons/gllm/zmtp.gd")
const CLIENT_OPS: Array[String] = ["hello", "generate", "cancel", "ping", "frame", "idle", "pin", "unpin", "embed"]
const LORE := (
	"You are a character in Eldmoor, a cold river town ruled by Duke Aldric from the grey keep on the "
	+ "hill. The old stone bridge is guarded by river spirits, the north road is closed since the dragon woke, "
	+ "merchants trade furs and salt at the market, and the bards sing of the fallen king every night at the inn."
)
const PINNED_PROMPT := (
	"The river spirits guard the old stone bridge of Eldmoor, and every traveller who "
	+ "crosses it after dark leaves a copper coin on the parapet for them."
)

var _spec: Dictionary = {}
var _host := "127.0.0.1"
var _port := 0
var _server: Dictionary = {}
var _fail := ""


## Records everything a client emits, and every breach of the event contract.
class Tracker:
	var streamed := {}
	var done := {}
	var failures := {}
	var ends := {}
	var connection: Array = []
	var errors: Array = []
	var stats: Array = []
	var pongs: Array = []
	var logprobs := {}
	var replies := {}  # id -> [op, values...]: the NPC-memory answers
	var bad := ""
	var on_completed := Callable()

	func attach(c: GllmClientScript) -> void:
		c.text_received.connect(_on_text)
		c.completed.connect(_on_completed)
		c.failed.connect(_on_failed)
		c.connection_changed.connect(func(up: bool) -> void: connection.append(up))
		c.error_received.connect(func(id: String, code: String, msg: String) -> void: errors.append([id, code, msg]))
		c.stats_received.connect(func(m: Dictionary) -> void: stats.append(m))
		c.pong_received.connect(func(rtt: float) -> void: pongs.append(rtt))
		c.logprobs_received.connect(_on_logprobs)
		c.snapshot_received.connect(
			func(id: String, n: int, blob: PackedByteArray) -> void: _reply(id, ["snapshot", n, blob])
		)
		c.restored.connect(func(id: String, n: int, blocks: int) -> void: _reply(id, ["restored", n, blocks]))
		c.pinned.connect(func(id: String, pin: String, n: int) -> void: _reply(id, ["pinned", pin, n]))
		c.unpinned.connect(func(id: String, pin: String, found: bool) -> void: _reply(id, ["unpinned", pin, found]))
		c.embeddings_received.connect(func(id: String, v: Array, n: int) -> void: _reply(id, ["embeddings", v, n]))

	func _reply(id: String, answer: Array) -> void:
		_end(id)
		replies[id] = answer

	func _on_text(id: String, delta: String, full: String) -> void:
		if ends.has(id):
			breach("text for %s after it ended" % id)
		if delta.is_empty():
			breach("an empty text_received for " + id)
		streamed[id] = streamed.get(id, "") + delta
		if streamed[id] != full:
			breach("full of %s is not the concatenation of its deltas" % id)

	func _on_completed(id: String, info: Dictionary) -> void:
		_end(id)
		done[id] = info
		if info["id"] != id:
			breach("completed(%s) carries the done of %s" % [id, info["id"]])
		if on_completed.is_valid():
			on_completed.call(id, info)

	func _on_failed(id: String, code: String, message: String) -> void:
		_end(id)
		failures[id] = [code, message]

	func _on_logprobs(id: String, entries: Array) -> void:
		if not logprobs.has(id):
			logprobs[id] = []
		logprobs[id].append_array(entries)

	func _end(id: String) -> void:
		ends[id] = ends.get(id, 0) + 1
		if ends[id] > 1:
			breach("%s ended %d times" % [id, ends[id]])

	func breach(what: String) -> void:
		if bad.is_empty():
			bad = what

	func text(id: String) -> String:
		return streamed.get(id, "")

	func ended(id: String) -> bool:
		return ends.has(id)

	func failure(id: String) -> String:
		return ": ".join(failures[id]) if failures.has(id) else ""


# ------------------------------------------------------------------------------------------------ main
func _initialize() -> void:
	var args := OS.get_cmdline_user_args()
	if args.is_empty():
		args = OS.get_cmdline_args()
	var spec_path := ""
	var only: Array = []
	var i := 0
	while i < args.size():
		if args[i] == "--spec" and i + 1 < args.size():
			spec_path = args[i + 1]
			i += 1
		elif args[i] == "--only" and i + 1 < args.size():
			only = Array(args[i + 1].split(","))
			i += 1
		i += 1
	if spec_path.is_empty():
		printerr("usage: godot --headless --script run_tests.gd -- --spec SPEC.json [--only a,b]")
		quit(2)
		return
	var parsed: Variant = JsonTyped.parse(FileAccess.get_file_as_string(spec_path))
	if not (parsed is Dictionary):
		printerr("cannot read the spec " + spec_path)
		quit(2)
		return
	_spec = parsed
	_host = _spec.get("host", "127.0.0.1")
	_port = _spec.get("port", 0)
	_server = _spec.get("server", {})
	var passed := 0
	var failed := 0
	for sc: Dictionary in _spec.get("scenarios", []):
		var name: String = sc["name"]
		if not only.is_empty() and not (name in only):
			continue
		var t0 := Time.get_ticks_usec()
		_fail = ""
		_run(name, sc)
		if _fail.is_empty():
			print("PASS " + name)
			passed += 1
		else:
			print("FAIL %s: %s" % [name, _fail.replace("\n", " ")])
			failed += 1
		print("METRIC %s wall_s=%s" % [name, _f((Time.get_ticks_usec() - t0) / 1e6)])
	print("%d passed, %d failed" % [passed, failed])
	quit(0 if failed == 0 else 1)


func _run(name: String, sc: Dictionary) -> void:
	match name:
		"vectors":
			_vectors()
		"handshake":
			_handshake()
		"fake-peers":
			_fake_peers()
		"concurrent-generate":
			_concurrent_generate(sc)
		"cancel":
			_cancel_mid_stream()
		"duplicate-id":
			_duplicate_id()
		"busy":
			_busy()
		"long-frame":
			_long_frame(sc)
		"errors":
			_errors()
		"warmup-frame-stats":
			_warmup_frame_stats()
		"pacing-deadline":
			_pacing_deadline()
		"npc-conversation":
			_npc()
		"poll-budget":
			_poll_budget()
		"lease-stall":
			_lease_stall()
		"session-dropped":
			_session_dropped()
		"idle-window":
			_idle_window()
		"structured-output":
			_structured_output(sc)
		"pin-unpin":
			_pin_unpin(sc)
		"embed":
			_embed(sc)
		"snapshot-restore":
			_snapshot_restore(sc)
		"server-restart":
			_server_restart(sc)
		"poll-cost":
			_poll_cost()
		"shutdown":
			_shutdown()
		_:
			check(false, "this runner does not know the scenario '%s'" % name)


# ------------------------------------------------------------------------------------------------ helpers
static func _f(v: float) -> String:
	return ("%.4f" % v).rstrip("0").rstrip(".")


## Records the first failed check of the scenario; later checks are skipped. Returns ok.
func check(ok: bool, what: String) -> bool:
	if not ok and _fail.is_empty():
		_fail = what
	return ok and _fail.is_empty()


func equal(expected: Variant, actual: Variant, what: String) -> bool:
	return check(
		deep_equals(expected, actual),
		"%s: expected %s, got %s" % [what, JsonTyped.dump(expected), JsonTyped.dump(actual)]
	)


static func deep_equals(a: Variant, b: Variant) -> bool:
	if typeof(a) != typeof(b):
		return false
	if a is Dictionary:
		if a.size() != b.size():
			return false
		for k: Variant in a:
			if not b.has(k) or not deep_equals(a[k], b[k]):
				return false
		return true
	if a is Array:
		if a.size() != b.size():
			return false
		for i in a.size():
			if not deep_equals(a[i], b[i]):
				return false
		return true
	return a == b


static func hex(s: String) -> PackedByteArray:
	return s.replace(" ", "").replace("\n", "").hex_decode()


static func to_hex(b: PackedByteArray) -> String:
	var parts := PackedStringArray()
	for x in b:
		parts.append("%02x" % x)
	return " ".join(parts)


func same_bytes(expected: PackedByteArray, actual: PackedByteArray, what: String) -> bool:
	return check(expected == actual, "%s: expected %s | got %s" % [what, to_hex(expected), to_hex(actual)])


func new_client(t: Tracker, wait: bool = true) -> GllmClientScript:
	var c := GllmClientScript.new()
	c.client_name = "godot-conformance/0.1"
	t.attach(c)
	c.connect_to_server(_host, _port)
	if wait:
		pump_until(c, func() -> bool: return c.is_connected_to_server(), 30, "the welcome")
	return c


## Polls the client every 2 ms until [param done] holds; a timeout fails the scenario (a hang guard only).
func pump_until(c: GllmClientScript, done: Callable, timeout_s: float, what: String) -> bool:
	var start := Time.get_ticks_msec()
	while not done.call():
		if not _fail.is_empty():
			return false
		if Time.get_ticks_msec() - start > timeout_s * 1000:
			return check(
				false,
				(
					"timed out after %s s waiting for %s (state %d, last error: %s)"
					% [timeout_s, what, c.get_state(), c.last_error]
				)
			)
		c.poll(5000)
		OS.delay_usec(2000)
	return true


## Polls for a while to catch anything emitted after the requests ended.
func settle(c: GllmClientScript, ms: int) -> void:
	var start := Time.get_ticks_msec()
	while Time.get_ticks_msec() - start < ms:
		c.poll(5000)
		OS.delay_usec(5000)


func no_breach(t: Tracker) -> void:
	check(t.bad.is_empty(), "event contract broken: " + t.bad)


func all_ended(t: Tracker, ids: Array) -> bool:
	for id: String in ids:
		if not t.ended(id):
			return false
	return true


static func options_from(v: Dictionary) -> Dictionary:
	var o := {}
	for k: String in v:
		if not (k in ["expected_text", "op", "continues", "suffix"]):
			o[k] = v[k]
	return o


static func long_request(prompt: String, max_tokens: int, id: String = "") -> Dictionary:
	var o := {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": true}
	if not id.is_empty():
		o["id"] = id
	return o


func server_int(key: String) -> int:
	return _server.get(key, 0)


func errs(t: Tracker) -> String:
	var parts := PackedStringArray()
	for e: Array in t.errors:
		parts.append("|".join(e))
	return "; ".join(parts)


# ------------------------------------------------------------------------------------------------ vectors
func _vectors() -> void:
	var vectors: Array = _spec.get("vectors", [])
	check(vectors.size() >= 20, "the spec holds only %d vectors" % vectors.size())
	var n_msgpack := 0
	var built := 0
	var zmtp_bytes := {}
	for v: Dictionary in vectors:
		var name: String = v["name"]
		var bytes := hex(v["hex"])
		if v.get("json") == null:
			zmtp_bytes[name] = bytes
			continue
		n_msgpack += 1
		var expected: Variant = JsonTyped.parse(v["json"])
		var dec: Array = MsgPack.decode(bytes)
		if not check(dec[1] == "", name + ": does not decode: " + str(dec[1])):
			return
		var decoded: Variant = dec[0]
		check(deep_equals(expected, decoded), "%s: decodes to %s, not %s" % [name, JsonTyped.dump(decoded), v["json"]])
		equal(JsonTyped.dump(expected), JsonTyped.dump(decoded), name + ": key order")
		same_bytes(bytes, MsgPack.encode(expected), name + ": the JSON value encoded")
		same_bytes(bytes, MsgPack.encode(decoded), name + ": the decoded value re-encoded")
		var m: Dictionary = expected
		var mine: Variant = _build(name, m)
		if mine != null:
			same_bytes(bytes, mine, name + ": the client's builder")
			built += 1
		elif m.get("op") in CLIENT_OPS:
			check(false, name + ": a client message vector with no builder check")
		_check_server_message(name, m)
	check(built >= 15, "only %d client vectors were built" % built)
	var n_zmtp := _check_zmtp(zmtp_bytes)
	_codec_edges()
	print("METRIC vectors msgpack=%d built=%d zmtp=%d" % [n_msgpack, built, n_zmtp])


func _build(name: String, v: Dictionary) -> Variant:
	if name == "stats-request":
		return GllmClientScript.build_stats()
	match v.get("op"):
		"hello":
			return GllmClientScript.build_hello(v.get("client", ""), v.get("token", ""), v["v"])
		"generate":
			var built: Array = GllmClientScript.build_generate(v["id"], options_from(v))
			check(built[1] == "", name + ": build_generate refused it: " + str(built[1]))
			return built[0]
		"cancel":
			return GllmClientScript.build_cancel(v["id"])
		"idle":
			return GllmClientScript.build_idle(v["ms"])
		"snapshot":
			if v.has("blob"):
				return null  # the server's reply
			return _built(
				name,
				GllmClientScript.build_snapshot(
					v["id"], v.get("conversation", ""), v.get("tokens", []), v.get("encoding", "")
				)
			)
		"pin":
			return _built(
				name,
				GllmClientScript.build_pin(v["id"], v.get("prompt", ""), v.get("messages", []), v.get("tokens", []))
			)
		"unpin":
			return _built(name, GllmClientScript.build_unpin(v["id"], v["pin"]))
		"embed":
			return _built(name, GllmClientScript.build_embed(v["id"], v["input"], v.get("pooling", "")))
		"ping":
			return GllmClientScript.build_ping(v.get("t"))
		"frame":
			return GllmClientScript.build_frame(
				v["ms"], v.get("target_ms", 0.0), v.get("max_ms", -1.0), v.get("frames", -1), v.get("over", -1)
			)
	return null


func _built(name: String, built: Array) -> Variant:
	check(built[1] == "", name + ": the builder refused it: " + str(built[1]))
	return built[0]


## The typed views of server messages read the vectors' fields.
func _check_server_message(name: String, m: Dictionary) -> void:
	if m.get("op") == "welcome":
		var w := GllmClientScript.welcome_info(m)
		equal(1, w["v"], name + " v")
		for key: String in ["model", "max_seq_len", "lease_ms", "max_inflight", "max_message_bytes", "server"]:
			equal(m[key], w[key], name + " " + key)
	elif m.get("op") == "embeddings":
		var vs := GllmClientScript.embedding_vectors(m)
		equal(m["vectors"].size(), vs.size(), name + " vectors")
		for i in vs.size():
			check(vs[i] is PackedFloat32Array, name + " vector %d is not a PackedFloat32Array" % i)
			equal(PackedFloat32Array(m["vectors"][i]), vs[i], name + " vector %d" % i)
	elif m.get("op") == "done":
		var d := GllmClientScript.done_info(m)
		for key: String in ["id", "finish_reason", "text"]:
			equal(m[key], d[key], name + " " + key)
		for key: String in ["prompt_tokens", "completion_tokens", "cached_tokens"]:
			equal(m["usage"][key], d[key], name + " " + key)
		equal(m["timings"]["ttft_ms"], d["ttft_ms"], name + " ttft_ms")
		equal(m["timings"]["total_ms"], d["total_ms"], name + " total_ms")
		equal(m["timings"].get("ttft_deadline_met"), d["ttft_deadline_met"], name + " ttft_deadline_met")


func _check_zmtp(v: Dictionary) -> int:
	var known: Array[String] = [
		"zmtp-greeting",
		"zmtp-ready-dealer",
		"zmtp-ready-router",
		"zmtp-ping",
		"zmtp-pong",
		"zmtp-frame-ping",
		"zmtp-frame-long-header",
		"zmtp-client-opening",
		"zmtp-frame-hello",
	]
	for name: String in v:
		check(name in known, "ZMTP vector %s has no check in this runner" % name)
	for name in known:
		if not check(v.has(name), "PROTOCOL.md lacks the vector " + name):
			return 0
	same_bytes(v["zmtp-greeting"], Zmtp.greeting(), "zmtp-greeting")
	same_bytes(v["zmtp-ready-dealer"], Zmtp.ready("DEALER"), "zmtp-ready-dealer")
	same_bytes(v["zmtp-ready-router"], Zmtp.ready("ROUTER"), "zmtp-ready-router")
	same_bytes(v["zmtp-client-opening"], Zmtp.client_opening(), "zmtp-client-opening")
	same_bytes(v["zmtp-frame-ping"], Zmtp.message_frame(GllmClientScript.build_ping(17)), "zmtp-frame-ping")
	same_bytes(v["zmtp-frame-hello"], Zmtp.message_frame(GllmClientScript.build_hello("unity/0.1")), "zmtp-frame-hello")
	equal("godot/0.1", GllmClientScript.new().client_name, "the default client name (vector hello-token)")
	same_bytes(v["zmtp-frame-long-header"], Zmtp.header(0, 300), "zmtp-frame-long-header")
	var zeros := PackedByteArray()
	zeros.resize(300)
	same_bytes(v["zmtp-frame-long-header"], Zmtp.message_frame(zeros).slice(0, 9), "a 300-byte message frame's header")

	# What the server sends, fed one byte at a time: greeting, READY (ROUTER), PING, a long message frame.
	var stream := PackedByteArray()
	stream.append_array(v["zmtp-greeting"])
	stream.append_array(v["zmtp-ready-router"])
	stream.append_array(v["zmtp-ping"])
	stream.append_array(Zmtp.message_frame(MsgPack.encode({"op": "done", "text": "x".repeat(400)})))
	stream.append_array(v["zmtp-frame-ping"])
	var reader := Zmtp.Reader.new()
	var frames := PackedStringArray()
	for i in stream.size():
		reader.feed(stream.slice(i, i + 1))
		while true:
			var fr: Array = reader.next_frame()
			if fr.is_empty():
				break
			var body: PackedByteArray = fr[1]
			if (fr[0] & Zmtp.FLAG_COMMAND) != 0:
				var cn: Array = Zmtp.command_name(body)
				if cn[0] == "READY":
					var props: Dictionary = Zmtp.parse_properties(body, cn[1])
					equal("ROUTER", props["Socket-Type"].get_string_from_ascii(), "READY Socket-Type")
					equal(0, props["Identity"].size(), "READY Identity")
				if cn[0] == "PING":
					same_bytes(v["zmtp-pong"], Zmtp.pong(body.slice(cn[1] + 2)), "zmtp-pong for zmtp-ping")
				frames.append(cn[0])
			else:
				var m: Dictionary = MsgPack.decode(body)[0]
				frames.append("%s:%d" % [m["op"], str(m.get("text", "")).length()])
	equal("READY,PING,done:400,ping:0", ",".join(frames), "frames parsed from the server's byte stream")
	check(reader.greeting_done and reader.error == "", "the server greeting was not accepted: " + reader.error)

	# Greetings a client must refuse (§2.1).
	var curve := Zmtp.greeting()
	var cname := "CURVE".to_ascii_buffer()
	for i in cname.size():
		curve[12 + i] = cname[i]
	check(Zmtp.check_greeting(curve).contains("CURVE"), "a CURVE greeting was accepted")
	var not_zmtp := Zmtp.greeting()
	not_zmtp[0] = 0x48
	check(Zmtp.check_greeting(not_zmtp) != "", "a greeting not starting with ff was accepted")
	var v2 := Zmtp.greeting()
	v2[10] = 2
	check(Zmtp.check_greeting(v2) != "", "a ZMTP 2 greeting was accepted")
	var padded := Zmtp.greeting()
	padded[8] = 0x05
	padded[11] = 0
	equal("", Zmtp.check_greeting(padded), "libzmq's padding, ZMTP 3.0")
	# A long-form header on a small body is accepted.
	var r2 := Zmtp.Reader.new()
	r2.feed(Zmtp.greeting())
	r2.feed(PackedByteArray([0x02, 0, 0, 0, 0, 0, 0, 0, 3, 0x81, 0xa0, 0xc0]))
	var f2: Array = r2.next_frame()
	check(not f2.is_empty() and f2[1].size() == 3, "a long-form header on a 3-byte body")
	return v.size()


## Every integer width, float32, str/array/map header sizes, malformed input, and the seed limit.
func _codec_edges() -> void:
	var ints: Array[int] = [
		0,
		127,
		128,
		255,
		256,
		65535,
		65536,
		4294967295,
		4294967296,
		9223372036854775807,
		-1,
		-32,
		-33,
		-128,
		-129,
		-32768,
		-32769,
		-2147483648,
		-2147483649,
		-9223372036854775807 - 1
	]
	var heads: Array[String] = [
		"00",
		"7f",
		"cc",
		"cc",
		"cd",
		"cd",
		"ce",
		"ce",
		"cf",
		"cf",
		"ff",
		"e0",
		"d0",
		"d0",
		"d1",
		"d1",
		"d2",
		"d2",
		"d3",
		"d3"
	]
	for i in ints.size():
		var b := MsgPack.encode(ints[i])
		equal(heads[i], "%02x" % b[0], "the header of %d" % ints[i])
		equal(ints[i], MsgPack.decode(b)[0], "%d round-trips" % ints[i])
	equal(1.5, MsgPack.decode(hex("ca 3f c0 00 00"))[0], "float32 1.5")
	equal(-5, MsgPack.decode(hex("d3 ff ff ff ff ff ff ff fb"))[0], "int64 -5 (not shortest) decodes")
	equal(7, MsgPack.decode(hex("cf 00 00 00 00 00 00 00 07"))[0], "uint64 7 (not shortest) decodes")
	equal(18446744073709551615.0, MsgPack.decode(hex("cf ff ff ff ff ff ff ff ff"))[0], "uint64 max as a float")
	for n: int in [31, 32, 255, 256, 65535, 65536]:
		var s := "a".repeat(n)
		var b := MsgPack.encode(s)
		var head := "bf" if n <= 31 else ("d9" if n <= 255 else ("da" if n <= 65535 else "db"))
		equal(head, "%02x" % b[0], "the str header of %d bytes" % n)
		equal(s, MsgPack.decode(b)[0], "a %d-byte string round-trips" % n)
	var list: Array = range(16)
	var lb := MsgPack.encode(list)
	equal("dc", "%02x" % lb[0], "array16 header")
	equal(list, MsgPack.decode(lb)[0], "array16 round-trips")
	var map := {}
	for i in 16:
		map["k%d" % i] = i
	var mb := MsgPack.encode(map)
	equal("de", "%02x" % mb[0], "map16 header")
	equal(map, MsgPack.decode(mb)[0], "map16 round-trips")
	var utf := "Ça " + String.chr(0x1F409)
	equal(utf, MsgPack.decode(MsgPack.encode(utf))[0], "UTF-8 with a 4-byte character")
	for bad: Array in [
		["82 a2 6f 70", "truncated msgpack"],
		["c0 c0", "trailing bytes"],
		["dd 7f ff ff ff", "an absurd array length"],
		["81 01 02", "an integer map key"],
		["c1", "the never-used byte c1"],
	]:
		check(MsgPack.decode(hex(bad[0]))[1] != "", bad[1] + " was accepted")
	# Seeds: GDScript ints are signed 64-bit; a seed above 2^63-1 is refused with a clear error.
	var big: Array = GllmClientScript.build_generate("s", {"prompt": "x", "seed": 18446744073709551615.0})
	check(big[1].contains("2^63-1"), "a seed above 2^63-1 was not refused clearly: " + str(big[1]))
	var big_s: Array = GllmClientScript.build_generate("s", {"prompt": "x", "seed": "9223372036854775808"})
	check(big_s[1].contains("2^63-1"), "a seed of 2^63 as a string was not refused clearly: " + str(big_s[1]))
	var neg: Array = GllmClientScript.build_generate("s", {"prompt": "x", "seed": -1})
	check(neg[1] != "", "a negative seed was accepted")
	var top: Array = GllmClientScript.build_generate("s", {"prompt": "x", "seed": 9223372036854775807})
	check(top[1] == "" and MsgPack.decode(top[0])[0]["seed"] == 9223372036854775807, "the seed 2^63-1 was refused")
	var both: Array = GllmClientScript.build_generate("s", {"prompt": "x", "messages": []})
	check(both[1] != "", "prompt and messages together were accepted")


# ------------------------------------------------------------------------------------------------ server
func _handshake() -> void:
	var t := Tracker.new()
	var c := new_client(t)
	var w := c.welcome
	if not _fail.is_empty():
		return
	equal(1, w["v"], "welcome.v")
	for key: String in ["max_seq_len", "lease_ms", "max_inflight", "max_message_bytes"]:
		equal(server_int(key), w[key], "welcome." + key)
	check(w["model"] != "", "welcome.model is empty")
	check(w["server"].begins_with("gllm/"), "welcome.server is " + w["server"])
	c.ping()
	pump_until(c, func() -> bool: return t.pongs.size() == 1, 30, "the pong")
	c.stats()
	pump_until(c, func() -> bool: return t.stats.size() == 1, 30, "the stats")
	if _fail.is_empty():
		check(t.pongs[0] >= 0.0, "a negative round trip")
		var s: Dictionary = t.stats[0]
		check(s.get("clients", 0) >= 1, "stats.clients %s" % s.get("clients"))
		equal(0, s.get("inflight"), "stats.inflight")
		check(s.get("kv_total_blocks", 0) > 0, "stats.kv_total_blocks")
	settle(c, 100)
	equal([true], t.connection, "connection_changed events")
	check(t.errors.is_empty(), "unexpected errors: " + errs(t))
	if _fail.is_empty():
		print("METRIC handshake rtt_ms=%s model=%s" % [_f(t.pongs[0]), w["model"]])
	c.close()


func _fake_peers() -> void:
	var ports: Dictionary = _spec.get("fake_peers", {})
	if not check(ports.size() >= 4, "the spec has no fake peers"):
		return
	_refused_by(ports["curve"], "CURVE")
	_refused_by(ports["error"], "no entry")
	_refused_by(ports["silent"], "no welcome")
	var t := Tracker.new()
	var c := GllmClientScript.new()
	c.client_name = "godot-conformance/0.1"
	t.attach(c)
	c.connect_to_server("127.0.0.1", ports["scripted"])
	pump_until(c, func() -> bool: return t.connection.size() == 1, 30, "the scripted peer's welcome")
	if _fail.is_empty():
		equal("fake", c.welcome["model"], "the joined welcome's model")
		equal(60000, c.welcome["lease_ms"], "the joined welcome's lease_ms")
		equal(4, c.welcome["max_inflight"], "the joined welcome's max_inflight")
	var id := c.generate(long_request("Hi", 2))
	pump_until(c, func() -> bool: return t.ended(id), 30, "the scripted reply")
	if _fail.is_empty() and check(t.done.has(id), "the scripted request failed: " + t.failure(id)):
		var d: Dictionary = t.done[id]
		equal("Hello", d["text"], "done.text joined from 3 MORE parts")
		equal("Hello", t.text(id), "the streamed text")
		equal("stop", d["finish_reason"], "finish_reason")
		equal(3, d["cached_tokens"], "cached_tokens")
		equal(null, d["ttft_ms"], "ttft_ms nil")
		equal(1.5, d["total_ms"], "total_ms")
		check(d["raw"].has("extra"), "the raw done keeps unknown keys")
		check(not t.streamed.has("not-mine"), "text of an unknown id was delivered")
	c.stats()
	pump_until(c, func() -> bool: return t.stats.size() == 1, 30, "the scripted stats")
	if _fail.is_empty():
		var s: Dictionary = t.stats[0]
		equal(1, s.get("pong_ok"), "the PONG echoed the PING's context")
		equal(0, s.get("hello_before_ready"), "a message sent before the server's READY")
		equal("godot-conformance/0.1", s.get("client"), "hello.client")
		check(t.errors.is_empty(), "errors from ignorable input: " + errs(t))
		no_breach(t)
	c.close()


func _refused_by(port: int, why: String) -> void:
	var t := Tracker.new()
	var c := GllmClientScript.new()
	c.handshake_timeout_ms = 500
	c.reconnect_min_ms = 100
	t.attach(c)
	c.connect_to_server("127.0.0.1", port)
	var id := c.generate(long_request("Anyone?", 4))
	pump_until(c, func() -> bool: return t.ended(id), 30, "the refusal (%s)" % why)
	if _fail.is_empty() and check(t.failures.has(id), "the request to a refusing peer did not fail (%s)" % why):
		equal("disconnected", t.failures[id][0], "its code (%s)" % why)
		check(t.failures[id][1].contains(why), "the failure does not say '%s': %s" % [why, t.failures[id][1]])
		equal(0, t.connection.size(), "connection_changed events from a refusing peer (%s)" % why)
		no_breach(t)
	c.close()


func compare_with_reference(t: Tracker, r: Dictionary) -> void:
	var id: String = r["id"]
	if not check(t.ended(id), id + " did not end"):
		return
	if not check(not t.failures.has(id), id + " failed: " + t.failure(id)):
		return
	var d: Dictionary = t.done[id]
	equal(d["text"], t.text(id), id + ": the streamed text vs done.text")
	equal(r["expected_text"], d["text"], id + ": the text vs the Python client's")
	equal(r["max_tokens"], d["completion_tokens"], id + ": completion_tokens")
	equal("length", d["finish_reason"], id + ": finish_reason")


func _concurrent_generate(sc: Dictionary) -> void:
	var refs: Array = sc.get("reference", [])
	if not check(refs.size() == 4, "4 reference requests expected"):
		return
	var ids: Array = refs.map(func(r: Dictionary) -> String: return r["id"])
	check(refs.any(func(r: Dictionary) -> bool: return r["expected_text"] != ""), "every reference text is empty")
	var t := Tracker.new()
	var c := new_client(t)
	for r: Dictionary in refs:
		equal(r["id"], c.generate(options_from(r)), "generate's id")
	pump_until(c, func() -> bool: return all_ended(t, ids), 120, "4 requests")
	settle(c, 200)
	for r: Dictionary in refs:
		compare_with_reference(t, r)
	for r: Dictionary in refs:
		if not _fail.is_empty():
			break
		var id: String = r["id"]
		if r.get("logprobs") == null:
			check(not t.logprobs.has(id), id + " got logprobs it did not ask for")
			continue
		if not check(t.logprobs.has(id), id + " got no logprobs"):
			break
		equal(t.done[id]["completion_tokens"], t.logprobs[id].size(), id + ": logprob entries")
		for e: Dictionary in t.logprobs[id]:
			check(e.get("token") is int and e.get("logprob") is float, id + ": a logprob entry " + JsonTyped.dump(e))
			equal(r["logprobs"], e.get("top", []).size(), id + ": top alternatives")
	no_breach(t)
	equal(0, c.pending_requests(), "pending_requests() after all ended")
	equal(0, c.in_flight(), "in_flight() after all ended")
	c.close()


func _cancel_mid_stream() -> void:
	var t := Tracker.new()
	var c := new_client(t)
	var id := c.generate(long_request("Once upon a time in Eldmoor", 200))
	pump_until(c, func() -> bool: return t.text(id) != "" or t.ended(id), 60, "the first text")
	check(not t.ended(id), "the request ended before it could be cancelled")
	c.cancel(id)
	pump_until(c, func() -> bool: return t.ended(id), 60, "the cancelled request's end")
	c.cancel(id)  # no longer in flight: ignored
	c.cancel("never-sent")
	c.ping()
	pump_until(c, func() -> bool: return t.pongs.size() == 1, 30, "a pong after the cancels")
	settle(c, 100)
	if _fail.is_empty() and check(not t.failures.has(id), "the cancelled request failed instead of completing"):
		var d: Dictionary = t.done[id]
		equal("cancelled", d["finish_reason"], "finish_reason")
		check(d["completion_tokens"] < 200, "completion_tokens %d after a cancel" % d["completion_tokens"])
		equal(d["text"], t.text(id), "the streamed text vs done.text")
		check(t.errors.is_empty(), "unexpected errors: " + errs(t))
		no_breach(t)
	c.close()


func _duplicate_id() -> void:
	var t := Tracker.new()
	var c := new_client(t)
	c.generate(long_request("The guard said", 60, "dup"))
	c.generate(long_request("The guard said", 60, "dup"))
	pump_until(c, func() -> bool: return t.ended("dup") and t.errors.size() > 0, 60, "the end and the duplicate_id")
	settle(c, 200)
	if _fail.is_empty():
		equal(1, t.errors.size(), "errors")
		equal("dup|duplicate_id", "%s|%s" % [t.errors[0][0], t.errors[0][1]], "the error")
		check(not t.failures.has("dup"), "the original request failed: " + t.failure("dup"))
	if _fail.is_empty():
		var d: Dictionary = t.done["dup"]
		equal("length", d["finish_reason"], "the original's finish_reason")
		equal(60, d["completion_tokens"], "the original's completion_tokens")
		equal(d["text"], t.text("dup"), "the streamed text vs done.text")
		equal(0, c.in_flight(), "in_flight() (the duplicate has no end of its own)")
		no_breach(t)
	c.close()


func _busy() -> void:
	var t := Tracker.new()
	var c := new_client(t)
	if not _fail.is_empty():
		return
	var max_inflight: int = c.welcome["max_inflight"]
	var ids: Array = []
	for i in max_inflight + 1:
		ids.append(c.generate(long_request("Busy market day number %d" % i, 200)))
	var last: String = ids[max_inflight]
	pump_until(c, func() -> bool: return t.ended(last), 60, "the busy answer")
	if (
		_fail.is_empty()
		and check(t.failures.has(last), "request %d of %d did not fail" % [max_inflight + 1, max_inflight + 1])
	):
		equal("busy", t.failures[last][0], "its code")
	for i in max_inflight:
		c.cancel(ids[i])
	pump_until(c, func() -> bool: return all_ended(t, ids), 120, "the cancelled requests")
	settle(c, 200)
	var any_cancelled := false
	for i in max_inflight:
		var id: String = ids[i]
		if not check(not t.failures.has(id), id + " failed: " + t.failure(id)):
			break
		equal(t.done[id]["text"], t.text(id), id + ": the streamed text vs done.text")
		any_cancelled = any_cancelled or t.done[id]["finish_reason"] == "cancelled"
	check(any_cancelled, "no request was cancelled")
	equal(0, c.in_flight(), "in_flight() after all ended")
	no_breach(t)
	c.close()


func _long_frame(sc: Dictionary) -> void:
	var r: Dictionary = sc["reference"][0]
	var o := options_from(r)
	var size: int = GllmClientScript.build_generate(r["id"], o)[0].size()
	check(size > 255, "the request is only %d bytes: not a long frame" % size)
	var t := Tracker.new()
	var c := new_client(t)
	c.generate(o)
	pump_until(c, func() -> bool: return t.ended(r["id"]), 60, "the request")
	compare_with_reference(t, r)
	no_breach(t)
	c.close()
	print("METRIC long-frame request_bytes=%d" % size)


func _errors() -> void:
	var t := Tracker.new()
	var c := new_client(t)
	var bad := c.generate({"prompt": "Hello", "temperature": -1.0, "max_tokens": 4})
	var huge := c.generate({"prompt": "the dragon sleeps under the hill ".repeat(120), "max_tokens": 4})
	pump_until(c, func() -> bool: return t.ended(bad) and t.ended(huge), 60, "the two errors")
	if _fail.is_empty() and check(t.failures.has(bad), "the bad request did not fail"):
		equal("bad_request", t.failures[bad][0], "the bad request's code")
		check(t.failures[bad][1].contains("temperature"), "the message does not name the field: " + t.failures[bad][1])
	if _fail.is_empty() and check(t.failures.has(huge), "the too-long request did not fail"):
		equal("too_long", t.failures[huge][0], "the long prompt's code")
	var ok := c.generate(long_request("Afterwards", 4))
	pump_until(c, func() -> bool: return t.ended(ok), 60, "a request after the errors")
	check(t.done.has(ok), "the request after the errors did not complete")
	settle(c, 100)
	equal([true], t.connection, "connection_changed events")
	no_breach(t)
	c.close()


func _warmup_frame_stats() -> void:
	var t := Tracker.new()
	var c := new_client(t)
	var w := c.warmup([{"role": "system", "content": LORE}, {"role": "user", "content": "Hello."}])
	pump_until(c, func() -> bool: return t.ended(w), 60, "the warmup")
	if not check(t.done.has(w), "the warmup did not complete: " + t.failure(w)):
		c.close()
		return
	check(t.done[w]["completion_tokens"] <= 1, "the warmup generated %d tokens" % t.done[w]["completion_tokens"])
	var messages := [{"role": "system", "content": LORE}, {"role": "user", "content": "Who rules the town?"}]
	var id := c.generate({"messages": messages, "max_tokens": 4, "temperature": 0.0})
	for i in 12:
		c.report_frame(16.0 + i % 3, 16.6)
		c.poll(1000)
		OS.delay_msec(30)
	pump_until(c, func() -> bool: return t.ended(id), 60, "the request after the warmup")
	if _fail.is_empty() and check(t.done.has(id), "the request after the warmup did not complete"):
		check(t.done[id]["cached_tokens"] > 0, "cached_tokens is 0: the warmup did not fill the prefix cache")
	c.stats()
	pump_until(c, func() -> bool: return t.stats.size() == 1, 30, "the stats")
	if _fail.is_empty():
		check(t.stats[0].get("prefix_cache_hits", 0) > 0, "stats.prefix_cache_hits is 0")
	settle(c, 100)
	check(t.errors.is_empty(), "errors after frame reports: " + errs(t))
	var governor := _frames_over_budget(c, t)
	no_breach(t)
	if _fail.is_empty():
		print(
			(
				"METRIC warmup-frame-stats cached_tokens=%d prompt_tokens=%d %s"
				% [t.done[id]["cached_tokens"], t.done[id]["prompt_tokens"], governor]
			)
		)
	c.close()


## While a long request runs, report_frame(30, 16.6) once per 16 ms frame for 2 s: every report carries max_ms,
## frames and over (all frames over, but for the first report, which also counts the frames before), so the
## engine yields (stats: governor_duty_pct below 100); then the long request is cancelled and ends once.
## Returns the METRIC fields.
func _frames_over_budget(c: GllmClientScript, t: Tracker) -> String:
	if not _fail.is_empty():
		return ""
	var long_id := c.generate(long_request("The long winter in Eldmoor began when", 200))
	pump_until(c, func() -> bool: return t.text(long_id) != "" or t.ended(long_id), 60, "the long request's text")
	var sent_before := c.frame_reports_sent
	var reports: Array = []
	var calls := 0
	var frame_usec := 16000
	var start := Time.get_ticks_usec()
	var next := 0
	while _fail.is_empty() and Time.get_ticks_usec() - start < 2000000:
		var n_before := c.frame_reports_sent
		c.report_frame(30.0, 16.6)
		calls += 1
		if c.frame_reports_sent != n_before:
			reports.append(c.last_frame_report.duplicate())
		c.poll(2000)
		next += frame_usec
		var sleep := next - (Time.get_ticks_usec() - start)
		if sleep > 0:
			OS.delay_usec(sleep)
	equal(reports.size(), c.frame_reports_sent - sent_before, "frame reports counted")
	check(reports.size() >= 6, "only %d frame reports in 2 s of frames (one per 250 ms expected)" % reports.size())
	var counted := 0
	for i in reports.size():
		if not _fail.is_empty():
			break
		var r: Dictionary = reports[i]
		var what := "frame report %d %s" % [i, JsonTyped.dump(r)]
		check(r.get("max_ms") is float and r.get("frames") is int and r.get("over") is int, what + ": lacks counts")
		if not _fail.is_empty():
			break
		equal(16.6, r.get("target_ms"), what + ": target_ms")
		equal(30.0, r["max_ms"], what + ": max_ms")
		check(r["frames"] >= 1 and r["over"] <= r["frames"], what + ": frames and over")
		check(r["ms"] > 16.6, what + ": the smoothed ms")
		if i == 0:
			check(r["over"] >= 1, what + ": no frame over")
		else:
			equal(r["frames"], r["over"], what + ": over (every frame took 30 ms)")
			counted += r["frames"]
	check(counted <= calls, "the reports count %d frames of %d" % [counted, calls])
	var n_stats := t.stats.size()
	c.stats()
	pump_until(c, func() -> bool: return t.stats.size() > n_stats, 30, "the stats after the slow frames")
	var duty: Variant = null
	if _fail.is_empty():
		duty = t.stats[n_stats].get("governor_duty_pct")
		check(duty is float or duty is int, "stats has no governor_duty_pct: " + JsonTyped.dump(t.stats[n_stats]))
	if _fail.is_empty():
		check(duty < 100, "governor_duty_pct is %s after 2 s of frames over their target" % duty)
	c.cancel(long_id)
	pump_until(c, func() -> bool: return t.ended(long_id), 60, "the long request's end")
	settle(c, 100)
	if _fail.is_empty() and check(t.done.has(long_id), "the long request failed: " + t.failure(long_id)):
		equal(t.done[long_id]["text"], t.text(long_id), "the long request's streamed text vs done.text")
	check(t.errors.is_empty(), "errors after the slow frames' reports: " + errs(t))
	if not _fail.is_empty():
		return ""
	return (
		"governor_duty_pct=%s frame_reports=%d frames=%d long_finish=%s"
		% [_f(float(duty)), reports.size(), calls, t.done[long_id]["finish_reason"]]
	)


## A paced request with a first-token deadline: 20 tokens at 25 a second take at least 0.6 s from the first text
## to the end, and done.timings says the deadline was met; pacing over 1000 tokens/s or a negative deadline is a
## bad_request naming the field.
func _pacing_deadline() -> void:
	var t := Tracker.new()
	var c := new_client(t)
	if not _fail.is_empty():
		return
	var times := {}
	var on_text := func(id: String, _d: String, _f: String) -> void:
		if not times.has("text:" + id):
			times["text:" + id] = Time.get_ticks_usec()
	var on_done := func(id: String, _i: Dictionary) -> void: times["done:" + id] = Time.get_ticks_usec()
	c.text_received.connect(on_text)
	c.completed.connect(on_done)
	var o := long_request("The bard began a slow ballad about the bridge", 20, "paced")
	o["max_tokens_per_s"] = 25.0
	o["ttft_deadline_ms"] = 60000.0
	var built: Array = GllmClientScript.build_generate("paced", o)
	if check(built[1] == "", "build_generate refused the paced request: " + str(built[1])):
		var m: Dictionary = MsgPack.decode(built[0])[0]
		var keys: Array = m.keys()
		equal(["ignore_eos", "max_tokens_per_s", "ttft_deadline_ms"], keys.slice(keys.size() - 3), "the key order")
		equal(25.0, m.get("max_tokens_per_s"), "max_tokens_per_s as a float")
	var id := c.generate(o)
	pump_until(c, func() -> bool: return t.ended(id), 60, "the paced request")
	var span_s := 0.0
	if _fail.is_empty() and check(t.done.has(id), "the paced request failed: " + t.failure(id)):
		var d: Dictionary = t.done[id]
		equal(20, d["completion_tokens"], "the paced request's completion_tokens")
		equal(d["text"], t.text(id), "the paced request's streamed text vs done.text")
		equal(true, d["ttft_deadline_met"], "done.timings.ttft_deadline_met")
		if check(times.has("text:" + id), "the paced request streamed no text"):
			span_s = (times["done:" + id] - times["text:" + id]) / 1e6
			check(span_s >= 0.6, "the first text to the end took %s s: not paced at 25 tokens/s" % _f(span_s))
	var fast := c.generate({"prompt": "Hurry", "max_tokens": 4, "max_tokens_per_s": 5000.0})
	var late := c.generate({"prompt": "Whenever", "max_tokens": 4, "ttft_deadline_ms": -1.0})
	pump_until(c, func() -> bool: return t.ended(fast) and t.ended(late), 60, "the two refusals")
	for pair: Array in [[fast, "max_tokens_per_s"], [late, "ttft_deadline_ms"]]:
		if not _fail.is_empty():
			break
		var rid: String = pair[0]
		if check(t.failures.has(rid), "the request with a bad %s did not fail" % pair[1]):
			equal("bad_request", t.failures[rid][0], pair[1] + ": the code")
			check(t.failures[rid][1].contains(pair[1]), "the message does not name the field: " + t.failures[rid][1])
	settle(c, 100)
	equal([true], t.connection, "connection_changed events")
	no_breach(t)
	if _fail.is_empty():
		var ttft: Variant = t.done[id]["ttft_ms"]
		print(
			(
				"METRIC pacing-deadline first_text_to_done_s=%s ttft_ms=%s total_ms=%s"
				% [_f(span_s), _f(float(ttft)) if ttft != null else "nil", _f(t.done[id]["total_ms"])]
			)
		)
	c.close()


func _npc() -> void:
	var t := Tracker.new()
	var c := new_client(t)
	var npc := Conversation.new("guard", "You are Brann, a tired town guard of Eldmoor.")
	npc.settings = {"max_tokens": 8, "temperature": 0.0, "ignore_eos": true}
	var id := npc.say(c, "Halt! Who goes there?")
	equal(id, npc.active_request_id, "active_request_id")
	pump_until(c, func() -> bool: return t.ended(id), 60, "the reply")
	if not check(t.done.has(id), "the reply did not complete: " + t.failure(id)):
		npc.detach()
		c.close()
		return
	equal("", npc.active_request_id, "active_request_id after the reply")
	equal(2, npc.history.size(), "history entries")
	equal("assistant", npc.history[1]["role"], "the reply's role")
	equal(t.done[id]["text"], npc.history[1]["content"], "the reply in the history")
	equal(t.text(id), npc.history[1]["content"], "the streamed reply")
	# A history far over max_seq_len: sent untrimmed the server refuses it; say() trims it to fit.
	for i in 30:
		npc.history.append(
			{"role": "user", "content": "Tell me again about the dragon on the north road, turn %d, all of it." % i}
		)
		npc.history.append(
			{
				"role": "assistant",
				"content":
				"The dragon sleeps in the hills past the old watchtower, and the road is closed, turn %d." % i
			}
		)
	var before := npc.history.size()
	var untrimmed := npc.build_messages()
	untrimmed.append({"role": "user", "content": "And now?"})
	var raw := c.generate({"messages": untrimmed, "max_tokens": 8})
	var trimmed := npc.say(c, "And now?")
	pump_until(c, func() -> bool: return t.ended(raw) and t.ended(trimmed), 60, "the untrimmed and trimmed requests")
	if not _fail.is_empty():
		npc.detach()
		c.close()
		return
	check(t.failures.has(raw) and t.failures[raw][0] == "too_long", "the untrimmed chat was not refused as too_long")
	check(t.done.has(trimmed), "the trimmed chat failed: " + t.failure(trimmed))
	if _fail.is_empty():
		check(npc.history.size() < before, "nothing was trimmed")
		equal("user", npc.history[0]["role"], "the trimmed history starts with")
		equal(t.done[trimmed]["text"], npc.history[-1]["content"], "the reply after trimming")
		# The save game: JSON, and a Resource round trip.
		var loaded := Conversation.new()
		if check(loaded.load_json(npc.to_json()), "load_json refused to_json's text"):
			equal(npc.history.size(), loaded.history.size(), "history entries after loading")
			equal(npc.history, loaded.history, "the history after loading")
			equal(npc.system_prompt, loaded.system_prompt, "the persona after loading")
			equal(npc.npc_name, loaded.npc_name, "the name after loading")
		var path := OS.get_user_data_dir().path_join("gllm-conformance-npc.tres")
		var err := ResourceSaver.save(npc, path)
		if check(err == OK, "ResourceSaver.save: " + error_string(err)):
			var res: Resource = ResourceLoader.load(path, "", ResourceLoader.CACHE_MODE_IGNORE)
			check(res != null and res.get("history") == npc.history, "the .tres save did not round-trip")
			DirAccess.remove_absolute(path)
	no_breach(t)
	if _fail.is_empty():
		print(
			(
				"METRIC npc-conversation trimmed_from=%d trimmed_to=%d prompt_tokens=%d"
				% [before, npc.history.size() - 2, t.done[trimmed]["prompt_tokens"]]
			)
		)
	npc.detach()
	c.close()


func _poll_budget() -> void:
	var t := Tracker.new()
	var order: Array = []
	var c := new_client(t)
	settle(c, 50)
	c.text_received.connect(func(id: String, _d: String, _f: String) -> void: order.append("text:" + id))
	c.completed.connect(func(id: String, _i: Dictionary) -> void: order.append("done:" + id))
	var a := c.generate(long_request("Budget story one", 24, "pb-a"))
	var b := c.generate(long_request("Budget story two", 24, "pb-b"))
	var start := Time.get_ticks_msec()
	while c.in_flight() > 0:  # receive() reads and queues; nothing is emitted without poll()
		if not check(Time.get_ticks_msec() - start < 60000, "the requests did not end within 60 s"):
			break
		c.receive()
		OS.delay_msec(10)
	equal(0, order.size(), "events emitted without poll()")
	var calls := 0
	while _fail.is_empty():
		var n := c.poll(0)
		if n == 0:
			break
		equal(1, n, "events emitted by poll(0)")
		calls += 1
		check(calls <= 100, "poll(0) keeps emitting")
	equal(4, calls, "poll(0) calls with an event (two merged texts, two ends): " + ",".join(order))
	for id in [a, b]:
		if not _fail.is_empty():
			break
		var ti := order.find("text:" + id)
		check(ti >= 0 and ti < order.find("done:" + id), "%s's text, then its end: %s" % [id, ",".join(order)])
		equal(24, t.done[id]["completion_tokens"], id + ": completion_tokens")
		equal(t.done[id]["text"], t.text(id), id + ": the one merged text vs done.text")
	equal(0, c.poll(100000), "events left")
	equal(0, c.pending_requests(), "pending_requests()")
	no_breach(t)
	c.close()


## GDScript has no I/O thread: the lease is kept from poll(). A main-thread stall longer than lease_ms ends the
## session; the client must notice, end the request in flight exactly once (failed "disconnected", unless it had
## already completed on the server), say hello again by itself (connection_changed false, then true), and serve
## a new request. (The C# client's I/O thread keeps the session instead; see scenarios.json.)
func _lease_stall() -> void:
	var t := Tracker.new()
	var c := new_client(t)
	if not _fail.is_empty():
		return
	var lease: int = c.welcome["lease_ms"]
	var id := c.generate(long_request("The long night in Eldmoor", 200))
	pump_until(c, func() -> bool: return t.text(id) != "", 60, "the first text")
	var stall := lease * 3 / 2 + 500
	OS.delay_msec(stall)  # the main thread stalls: no poll(), as in a scene load
	pump_until(
		c, func() -> bool: return t.ended(id) and t.connection.size() >= 3, 60, "the request's end and the reconnect"
	)
	if _fail.is_empty():
		if t.failures.has(id):
			equal("disconnected", t.failures[id][0], "the stalled request's code")
		else:
			equal(t.done[id]["text"], t.text(id), "the streamed text vs done.text")
		equal([true, false, true], t.connection, "connection_changed events")
		check(c.reconnects >= 1, "no reconnect")
	var after := c.generate(long_request("Awake again", 8))
	pump_until(c, func() -> bool: return t.ended(after), 60, "a request after the stall")
	check(t.done.has(after), "the request after the stall failed: " + t.failure(after))
	no_breach(t)
	if _fail.is_empty():
		var how := "failed" if t.failures.has(id) else "completed"
		print("METRIC lease-stall lease_ms=%d stall_ms=%d stalled_request=%s" % [lease, stall, how])
	c.close()


func _session_dropped() -> void:
	var t := Tracker.new()
	var c := GllmClientScript.new()
	c.client_name = "godot-conformance/0.1"
	c.send_keepalives = false
	t.attach(c)
	c.connect_to_server(_host, _port)
	pump_until(c, func() -> bool: return c.is_connected_to_server(), 30, "the welcome")
	if not _fail.is_empty():
		return
	var lease: int = c.welcome["lease_ms"]
	var ids: Array = []
	for i in 4:
		ids.append(c.generate(long_request("A silent client number %d" % i, 240)))
	pump_until(
		c,
		func() -> bool: return ids.all(func(x: String) -> bool: return t.text(x) != "" or t.ended(x)),
		60,
		"the first texts"
	)
	var start := Time.get_ticks_msec()
	while Time.get_ticks_msec() - start < lease + 1000:  # silent past the lease (polling, no pings)
		c.poll(5000)
		OS.delay_msec(5)
	var late := c.generate(long_request("Anyone still listening?", 8))  # answered with no_session
	ids.append(late)
	pump_until(
		c, func() -> bool: return all_ended(t, ids) and t.connection.size() >= 3, 60, "the failures and the reconnect"
	)
	if not _fail.is_empty():
		c.close()
		return
	check(t.failures.has(late), "the request sent after the lease expired did not fail")
	var n_failed := 0
	for id: String in ids:
		if t.failures.has(id):
			n_failed += 1
			equal("disconnected", t.failures[id][0], id + "'s code")
			check(
				t.failures[id][1].contains("session") or t.failures[id][1].contains("closed"),
				id + "'s message does not say why: " + t.failures[id][1]
			)
		else:
			equal("length", t.done[id]["finish_reason"], id + ": finish_reason")
			equal(t.done[id]["text"], t.text(id), id + ": streamed vs done")
	equal([true, false, true], t.connection, "connection_changed events")
	check(c.reconnects >= 1, "no reconnect")
	equal(0, c.in_flight(), "in_flight() after the drop")
	var after := c.generate(long_request("Back again", 8))
	pump_until(c, func() -> bool: return t.ended(after), 60, "a request after the reconnect")
	check(t.done.has(after), "the request after the reconnect failed: " + t.failure(after))
	no_breach(t)
	if _fail.is_empty():
		print("METRIC session-dropped failed=%d completed=%d" % [n_failed, ids.size() - n_failed])
	c.close()


func _server_restart(sc: Dictionary) -> void:
	var r: Dictionary = sc["reference"][0]
	var t := Tracker.new()
	var c := GllmClientScript.new()
	c.client_name = "godot-conformance/0.1"
	c.reconnect_min_ms = 100
	c.reconnect_max_ms = 1000
	t.attach(c)
	c.connect_to_server(_host, _port)
	pump_until(c, func() -> bool: return c.is_connected_to_server(), 30, "the welcome")
	var ids: Array = []
	for i in 3:
		ids.append(c.generate(long_request("Before the restart, story %d" % i, 240)))
	pump_until(
		c,
		func() -> bool: return ids.all(func(x: String) -> bool: return t.text(x) != "" or t.ended(x)),
		60,
		"the first texts"
	)
	check(not ids.any(func(x: String) -> bool: return t.ended(x)), "a request ended before the restart")
	print("@@ restart-server")
	var reply := OS.read_string_from_stdin(1024).strip_edges()  # blocks the main thread meanwhile
	check(reply == "@@ restarted", "the harness did not restart the server: " + reply)
	pump_until(
		c, func() -> bool: return all_ended(t, ids) and t.connection.size() >= 3, 90, "the failures and the reconnect"
	)
	for id: String in ids:
		if not _fail.is_empty():
			break
		if check(t.failures.has(id), id + " did not fail"):
			equal("disconnected", t.failures[id][0], id + "'s code")
	equal([true, false, true], t.connection, "connection_changed events")
	c.generate(options_from(r))
	pump_until(c, func() -> bool: return t.ended(r["id"]), 60, "a request after the restart")
	compare_with_reference(t, r)
	no_breach(t)
	print("METRIC server-restart reconnects=%d" % c.reconnects)
	c.close()


# ------------------------------------------------------------------------------------ NPC memory, idle, structured
func stats_value(c: GllmClientScript, t: Tracker, key: String) -> int:
	var n := t.stats.size()
	c.stats()
	if not pump_until(c, func() -> bool: return t.stats.size() > n, 30, "the stats"):
		return -1
	var m: Dictionary = t.stats[-1]
	check(m.get(key) is int, "stats carries no %s: %s" % [key, JsonTyped.dump(m)])
	return m.get(key, -1)


## The answer [op, ...] to an NPC-memory op, or [] (and a failed check) when it failed or has another op.
func answer(t: Tracker, id: String, op: String) -> Array:
	if not check(not t.failures.has(id), id + " failed: " + t.failure(id)):
		return []
	if not check(t.replies.has(id), id + " got no answer"):
		return []
	var a: Array = t.replies[id]
	if not check(a[0] == op, "%s was answered with %s, not %s" % [id, a[0], op]):
		return []
	return a


func _idle_window() -> void:
	var t := Tracker.new()
	var c := new_client(t)
	var before := stats_value(c, t, "window_reports")
	for i in 3:
		c.report_idle(4.0)
	c.report_idle(-1.0)
	c.report_idle(NAN)
	equal(before + 3, stats_value(c, t, "window_reports"), "window_reports after 3 report_idle (and 2 invalid)")
	var steps := stats_value(c, t, "window_steps")
	var id := c.generate(long_request("In the idle windows the engine", 8))
	var start := Time.get_ticks_msec()
	while not t.ended(id) and _fail.is_empty():
		if Time.get_ticks_msec() - start > 60000:
			check(false, "timed out waiting for the generate inside idle windows")
			break
		OS.delay_usec(4000)  # the frame's work
		c.poll(1000)
		c.report_idle(12.0)  # the rest of the 16 ms frame is the engine's
		OS.delay_usec(12000)
	if (
		_fail.is_empty()
		and check(t.done.has(id), "the generate inside idle windows did not complete: " + t.failure(id))
	):
		equal(8, t.done[id]["completion_tokens"], "completion_tokens inside idle windows")
	var after := stats_value(c, t, "window_steps")
	check(
		after > steps, "window_steps did not grow (%d -> %d): the engine did not step in the windows" % [steps, after]
	)
	no_breach(t)
	c.close()


func _structured_output(sc: Dictionary) -> void:
	var refs: Array = sc["reference"]
	var t := Tracker.new()
	var c := new_client(t)
	var ids: Array = []
	for r: Dictionary in refs:
		ids.append(c.generate(options_from(r)))
	var bad_schema := c.generate({"prompt": "x", "max_tokens": 4, "json_schema": "{not json"})
	var two_at_once := c.generate({"prompt": "x", "max_tokens": 4, "regex": "[0-9]", "choice": ["a"]})
	ids.append_array([bad_schema, two_at_once])
	pump_until(c, func() -> bool: return all_ended(t, ids), 120, "the structured requests")
	for r: Dictionary in refs:
		var id: String = r["id"]
		if not _fail.is_empty() or not check(t.done.has(id), id + " failed: " + t.failure(id)):
			break
		var d: Dictionary = t.done[id]
		equal("stop", d["finish_reason"], id + ": finish_reason")
		equal(d["text"], t.text(id), id + ": the streamed text vs done.text")
		equal(r["expected_text"], d["text"], id + ": the text vs the Python client's")
		var text: String = d["text"]
		if r.has("json_schema"):
			var obj: Variant = JSON.parse_string(text)
			if check(obj is Dictionary, id + ": the text is not a JSON object: " + text):
				check(obj.get("action") in ["open_gate", "wait"], id + ": action " + str(obj.get("action")))
				check(obj.get("mood") in ["calm", "angry"], id + ": mood " + str(obj.get("mood")))
		elif r.has("choice"):
			check(text in r["choice"], id + ": %s is not one of the choices" % JSON.stringify(text))
		else:
			var re := RegEx.create_from_string("^[0-9]{2}-[0-9]{2}$")
			check(re.search(text) != null, id + ": %s does not match the regex" % JSON.stringify(text))
	if _fail.is_empty() and check(t.failures.has(bad_schema), "the malformed json_schema did not fail"):
		equal("bad_request", t.failures[bad_schema][0], "the malformed json_schema's code")
		check(
			t.failures[bad_schema][1].contains("json_schema"),
			"the message does not name json_schema: " + t.failure(bad_schema)
		)
	if _fail.is_empty() and check(t.failures.has(two_at_once), "regex with choice did not fail"):
		equal("bad_request", t.failures[two_at_once][0], "regex with choice: the code")
		var msg: String = t.failures[two_at_once][1]
		check(msg.contains("regex") and msg.contains("choice"), "the message does not name regex and choice: " + msg)
	var ok := c.generate(long_request("Still serving", 4))
	pump_until(c, func() -> bool: return t.ended(ok), 60, "a request after the errors")
	check(t.done.has(ok), "the request after the errors did not complete")
	no_breach(t)
	c.close()


func _pin_unpin(sc: Dictionary) -> void:
	var lore: Array = sc["lore"]
	var t := Tracker.new()
	var c := new_client(t)
	var p1 := c.pin(lore)
	pump_until(c, func() -> bool: return t.ended(p1), 60, "the pin")
	var first := answer(t, p1, "pinned")
	if first.is_empty():
		return
	var pin_name: String = first[1]
	check(pin_name.begins_with("pin-") and first[2] > 0, "pinned %s of %d tokens" % [pin_name, first[2]])
	equal(1, stats_value(c, t, "pins"), "stats pins after pin")
	check(stats_value(c, t, "pinned_blocks") > 0, "stats pinned_blocks is 0 after pin")
	var p2 := c.pin(lore)
	pump_until(c, func() -> bool: return t.ended(p2), 60, "the second pin")
	var second := answer(t, p2, "pinned")
	if not second.is_empty():
		equal(pin_name, second[1], "the same lore's pin name")
	var u1 := c.unpin(pin_name)
	var u2 := c.unpin(pin_name)
	pump_until(c, func() -> bool: return t.ended(u1) and t.ended(u2), 60, "the unpins")
	var a1 := answer(t, u1, "unpinned")
	var a2 := answer(t, u2, "unpinned")
	if not a1.is_empty() and not a2.is_empty():
		check(a1[2] == true and a1[1] == pin_name, "the first unpin: found %s, pin %s" % [a1[2], a1[1]])
		check(a2[2] == false, "the second unpin found the pin")
	equal(0, stats_value(c, t, "pins"), "stats pins after unpin")
	var many := PackedInt64Array()
	for i in server_int("max_seq_len") + 44:
		many.append(1000 + i)
	var big := c.pin(many)
	var pp := c.pin(PINNED_PROMPT)
	pump_until(c, func() -> bool: return t.ended(big) and t.ended(pp), 60, "the token and prompt pins")
	if _fail.is_empty() and check(t.failures.has(big), "a pin longer than max_seq_len did not fail"):
		equal("too_long", t.failures[big][0], "the long pin's code")
	var prompt := answer(t, pp, "pinned")
	if not prompt.is_empty():
		check(prompt[2] > 0 and prompt[1] != pin_name, "the prompt's pin: %s of %d tokens" % [prompt[1], prompt[2]])
		var u3 := c.unpin(prompt[1])
		pump_until(c, func() -> bool: return t.ended(u3), 60, "the prompt's unpin")
		var a3 := answer(t, u3, "unpinned")
		check(not a3.is_empty() and a3[2] == true, "the prompt's pin was not found")
	equal(0, stats_value(c, t, "pins"), "stats pins at the end")
	equal(0, c.in_flight(), "in_flight after every op ended")
	no_breach(t)
	c.close()


func _embed(sc: Dictionary) -> void:
	var er: Dictionary = sc["embed_reference"]
	var input: Array = er["input"]
	var expected: Array = er["expected_vectors"]
	if not check(input.size() == 3 and input[0] == input[2] and input[0] != input[1], "the input is not [a, b, a]"):
		return
	var t := Tracker.new()
	var c := new_client(t)
	var e1 := c.embed(PackedStringArray(input))
	var e2 := c.embed(input[1])
	var bad := c.embed([""])
	pump_until(c, func() -> bool: return t.ended(e1) and t.ended(e2) and t.ended(bad), 60, "the embeddings")
	var got := answer(t, e1, "embeddings")
	var alone := answer(t, e2, "embeddings")
	if got.is_empty() or alone.is_empty():
		return
	var vs: Array = got[1]
	if not equal(3, vs.size(), "vectors for 3 inputs"):
		return
	check(got[2] > 0, "prompt_tokens %d" % got[2])
	for i in 3:
		var v: PackedFloat32Array = vs[i]
		if not equal(expected[i].size(), v.size(), "the dimension of vector %d" % i):
			return
		var norm := 0.0
		for j in v.size():
			var want := float(expected[i][j])
			if not check(
				absf(want - v[j]) < 1e-6, "vector %d[%d] is %s, the Python client got %s" % [i, j, v[j], want]
			):
				return
			norm += v[j] * v[j]
		check(absf(sqrt(norm) - 1.0) < 1e-5, "vector %d has norm %s" % [i, sqrt(norm)])
	check(vs[0] == vs[2], "identical texts gave different vectors")
	check(vs[0] != vs[1], "different texts gave the same vector")
	check(alone[1].size() == 1 and alone[1][0] == vs[1], "the second text alone gave another vector")
	if _fail.is_empty() and check(t.failures.has(bad), "an empty input did not fail"):
		equal("bad_request", t.failures[bad][0], "the empty input's code")
		check(t.failures[bad][1].contains("input"), "the message does not name input: " + t.failure(bad))
	no_breach(t)
	c.close()


func _snapshot_restore(sc: Dictionary) -> void:
	var r1: Dictionary = sc["reference"][0]
	var r2: Dictionary = sc["reference"][1]
	var t := Tracker.new()
	var c := GllmClientScript.new()
	c.client_name = "godot-conformance/0.1"
	c.reconnect_min_ms = 100
	c.reconnect_max_ms = 1000
	t.attach(c)
	c.connect_to_server(_host, _port)
	pump_until(c, func() -> bool: return c.is_connected_to_server(), 30, "the welcome")
	var conv := c.generate(options_from(r1))
	pump_until(c, func() -> bool: return t.ended(conv), 60, "the conversation")
	compare_with_reference(t, r1)
	var s := c.snapshot(conv, "int8")
	pump_until(c, func() -> bool: return t.ended(s), 60, "the snapshot")
	var snap := answer(t, s, "snapshot")
	if snap.is_empty():
		return
	var blob: PackedByteArray = snap[2]
	var tokens: int = snap[1]
	var d: Dictionary = t.done[conv]
	check(not blob.is_empty(), "the snapshot blob is empty")
	var total: int = d["prompt_tokens"] + d["completion_tokens"]
	check(tokens > 0 and tokens <= total, "the snapshot holds %d tokens of a %d-token conversation" % [tokens, total])
	print("@@ restart-server")
	var reply := OS.read_string_from_stdin(1024).strip_edges()  # blocks the main thread meanwhile
	check(reply == "@@ restarted", "the harness did not restart the server: " + reply)
	pump_until(c, func() -> bool: return t.connection.size() >= 3 and c.is_connected_to_server(), 90, "the reconnect")
	equal([true, false, true], t.connection, "connection_changed events")
	var damaged := blob.duplicate()
	damaged[damaged.size() / 2] ^= 0x01
	var bad := c.restore(damaged)
	pump_until(c, func() -> bool: return t.ended(bad), 60, "the damaged restore")
	if _fail.is_empty() and check(t.failures.has(bad), "a damaged blob was restored"):
		equal("bad_request", t.failures[bad][0], "the damaged blob's code")
		check(not t.failures[bad][1].is_empty(), "the damaged blob's error has no message")
	var rs := c.restore(blob)
	pump_until(c, func() -> bool: return t.ended(rs), 60, "the restore")
	var restored := answer(t, rs, "restored")
	if restored.is_empty():
		return
	equal(tokens, restored[1], "the restored tokens")
	check(restored[2] > 0, "the restore added no KV blocks to the fresh server")
	var cont := c.generate(options_from(r2))
	pump_until(c, func() -> bool: return t.ended(cont), 60, "the continuation")
	compare_with_reference(t, r2)
	if _fail.is_empty():
		var cached: int = t.done[cont]["cached_tokens"]
		check(
			cached >= restored[1], "the continuation reports %d cached tokens; %d were restored" % [cached, restored[1]]
		)
	equal(0, c.in_flight(), "in_flight after every op ended")
	no_breach(t)
	c.close()


func _poll_cost() -> void:
	var t := Tracker.new()
	var c := new_client(t)
	var frame_usec := 1000000 / 60
	var idle := _run_frames(c, 120, frame_usec, [])
	var ids: Array = []
	var state := {"replace": true, "serial": 0}
	var start_stream := func() -> void:
		ids.append(c.generate(long_request("Stream %d of the market crowd" % state["serial"], 48)))
		state["serial"] += 1
	t.on_completed = func(_id: String, _info: Dictionary) -> void:
		if state["replace"]:
			start_stream.call()
	for i in 16:
		start_stream.call()
	pump_until(c, func() -> bool: return ids.any(func(x: String) -> bool: return t.text(x) != ""), 60, "the first text")
	var with_events: Array = []
	var busy := _run_frames(c, 150, frame_usec, with_events)
	state["replace"] = false
	for id: String in ids.duplicate():
		if not t.ended(id):
			c.cancel(id)
	pump_until(c, func() -> bool: return all_ended(t, ids), 120, "every stream's end")
	settle(c, 200)
	var completed := 0
	for id: String in ids:
		if not check(t.done.has(id), id + " failed: " + t.failure(id)):
			break
		equal(t.done[id]["text"], t.text(id), id + ": the streamed text vs done.text")
		completed += 1 if t.done[id]["finish_reason"] == "length" else 0
	no_breach(t)
	var line := (
		"METRIC poll-cost idle_median_ms=%s idle_p99_ms=%s idle_max_ms=%s"
		% [_f(pct(idle, 50)), _f(pct(idle, 99)), _f(idle.max())]
	)
	line += (
		" streams16_median_ms=%s streams16_p99_ms=%s streams16_max_ms=%s"
		% [_f(pct(busy, 50)), _f(pct(busy, 99)), _f(busy.max())]
	)
	line += (
		" frames_idle=%d frames_streams16=%d frames_with_events=%d" % [idle.size(), busy.size(), with_events.size()]
	)
	if not with_events.is_empty():
		line += (
			" with_events_median_ms=%s with_events_p99_ms=%s" % [_f(pct(with_events, 50)), _f(pct(with_events, 99))]
		)
	line += " streams_completed=%d streams_total=%d" % [completed, ids.size()]
	print(line)
	t.on_completed = Callable()
	c.close()


## A 60-fps loop: poll(2 ms) each frame, then sleep to the next frame. Returns every frame's poll cost in ms;
## [param with_events] gets those of the frames whose poll emitted something.
func _run_frames(c: GllmClientScript, frames: int, frame_usec: int, with_events: Array) -> Array:
	var costs: Array = []
	var start := Time.get_ticks_usec()
	var next := 0
	for f in frames:
		var t0 := Time.get_ticks_usec()
		var n := c.poll(2000)
		var ms := (Time.get_ticks_usec() - t0) / 1000.0
		costs.append(ms)
		if n > 0:
			with_events.append(ms)
		next += frame_usec
		var sleep := next - (Time.get_ticks_usec() - start)
		if sleep > 0:
			OS.delay_usec(sleep)
	return costs


static func pct(xs: Array, p: float) -> float:
	var s := xs.duplicate()
	s.sort()
	var i := ceili(p / 100.0 * s.size()) - 1
	return s[clampi(i, 0, s.size() - 1)]


func _shutdown() -> void:
	var t := Tracker.new()
	var c := new_client(t)
	var ids: Array = [
		c.generate(long_request("Closing time, story one", 200)),
		c.generate(long_request("Closing time, story two", 200))
	]
	pump_until(
		c, func() -> bool: return ids.all(func(x: String) -> bool: return t.text(x) != ""), 60, "the first texts"
	)
	var t0 := Time.get_ticks_usec()
	c.close()
	var close_ms := (Time.get_ticks_usec() - t0) / 1000.0
	check(close_ms < 5000, "close() took %s ms" % close_ms)
	pump_until(c, func() -> bool: return all_ended(t, ids), 10, "the requests' ends after close()")
	settle(c, 100)
	for id: String in ids:
		if check(t.failures.has(id), id + " did not fail after close()"):
			equal("disconnected", t.failures[id][0], id + "'s code")
	equal(GllmClientScript.State.CLOSED, c.get_state(), "the state after close()")
	equal(0, c.in_flight(), "in_flight() after close()")
	no_breach(t)
	# Nothing listening: the request fails with disconnected; close() is clean.
	var server := TCPServer.new()
	server.listen(0, "127.0.0.1")
	var free_port := server.get_local_port()
	server.stop()
	var t2 := Tracker.new()
	var c2 := GllmClientScript.new()
	c2.reconnect_min_ms = 100
	t2.attach(c2)
	c2.connect_to_server("127.0.0.1", free_port)
	var lonely := c2.generate(long_request("Is anyone there?", 4))
	pump_until(c2, func() -> bool: return t2.ended(lonely), 30, "the request to nowhere")
	if _fail.is_empty() and check(t2.failures.has(lonely), "the request to nowhere did not fail"):
		equal("disconnected", t2.failures[lonely][0], "its code")
		check(not c2.is_connected_to_server(), "connected to nothing")
		check(c2.last_error != "", "no last_error")
	t0 = Time.get_ticks_usec()
	c2.close()
	var close2 := (Time.get_ticks_usec() - t0) / 1000.0
	check(close2 < 5000, "close() took %s ms" % close2)
	no_breach(t2)
	if _fail.is_empty():
		print(
			(
				'METRIC shutdown close_ms=%s close_unconnected_ms=%s refused_reason="%s"'
				% [_f(close_ms), _f(close2), t2.failures[lonely][1].replace('"', "'")]
			)
		)


## JSON that keeps msgpack's int/float distinction (a number with a decimal point or exponent is a float) and
## key order; Godot's JSON class reads every number as a float.
class JsonTyped:
	static func parse(text: String) -> Variant:
		var p := JsonParser.new(text)
		var v: Variant = p.value()
		p.skip_ws()
		if p.error != "" or p.pos != text.length():
			push_error("JSON: %s at %d" % [p.error if p.error != "" else "trailing text", p.pos])
			return null
		return v

	static func dump(v: Variant) -> String:
		match typeof(v):
			TYPE_NIL:
				return "null"
			TYPE_BOOL:
				return "true" if v else "false"
			TYPE_INT:
				return str(v)
			TYPE_FLOAT:
				var s := str(v)
				return s if ("." in s or "e" in s or "n" in s) else s + ".0"
			TYPE_STRING:
				return JSON.stringify(v)
			TYPE_ARRAY:
				var parts := PackedStringArray()
				for x: Variant in v:
					parts.append(dump(x))
				return "[" + ",".join(parts) + "]"
			TYPE_DICTIONARY:
				var parts := PackedStringArray()
				for k: Variant in v:
					parts.append(JSON.stringify(str(k)) + ":" + dump(v[k]))
				return "{" + ",".join(parts) + "}"
		return str(v)


class JsonParser:
	var s: String
	var pos := 0
	var error := ""

	func _init(text: String) -> void:
		s = text

	func skip_ws() -> void:
		while pos < s.length() and s[pos] in [" ", "\n", "\r", "\t"]:
			pos += 1

	func value() -> Variant:
		skip_ws()
		if pos >= s.length():
			error = "unexpected end"
			return null
		var ch := s[pos]
		if ch == "{":
			pos += 1
			var d := {}
			skip_ws()
			if pos < s.length() and s[pos] == "}":
				pos += 1
				return d
			while error == "":
				skip_ws()
				var k: Variant = value()
				skip_ws()
				if not (k is String) or pos >= s.length() or s[pos] != ":":
					error = "bad object"
					return null
				pos += 1
				d[k] = value()
				skip_ws()
				if pos < s.length() and s[pos] == ",":
					pos += 1
				elif pos < s.length() and s[pos] == "}":
					pos += 1
					return d
				else:
					error = "bad object"
			return null
		if ch == "[":
			pos += 1
			var a := []
			skip_ws()
			if pos < s.length() and s[pos] == "]":
				pos += 1
				return a
			while error == "":
				a.append(value())
				skip_ws()
				if pos < s.length() and s[pos] == ",":
					pos += 1
				elif pos < s.length() and s[pos] == "]":
					pos += 1
					return a
				else:
					error = "bad array"
			return null
		if ch == '"':
			return _string()
		if s.substr(pos, 4) == "true":
			pos += 4
			return true
		if s.substr(pos, 5) == "false":
			pos += 5
			return false
		if s.substr(pos, 4) == "null":
			pos += 4
			return null
		var start := pos
		while (
			pos < s.length() and (s[pos] in ["-", "+", ".", "e", "E", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9"])
		):
			pos += 1
		var num := s.substr(start, pos - start)
		if num.is_empty():
			error = "unexpected character " + ch
			return null
		if "." in num or "e" in num or "E" in num:
			return num.to_float()
		if num.length() >= 19 and not num.is_valid_int():
			return num.to_float()  # beyond a 64-bit int
		return num.to_int()

	func _string() -> Variant:
		pos += 1
		var out := ""
		while pos < s.length():
			var ch := s[pos]
			if ch == '"':
				pos += 1
				return out
			if ch == "\\":
				var e := s[pos + 1]
				pos += 2
				match e:
					"n":
						out += "\n"
					"t":
						out += "\t"
					"r":
						out += "\r"
					"b":
						out += "\b"
					"f":
						out += "\f"
					"u":
						var code := s.substr(pos, 4).hex_to_int()
						pos += 4
						if code >= 0xD800 and code < 0xDC00 and s.substr(pos, 2) == "\\u":
							var low := s.substr(pos + 2, 4).hex_to_int()
							pos += 6
							code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
						out += String.chr(code)
					_:
						out += e
				continue
			out += ch
			pos += 1
		error = "unterminated string"
		return null
