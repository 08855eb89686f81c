## Three NPCs answer the player's typed line at once; each reply streams into its speech bubble with a
## typewriter effect. The NPC the player faces (Left/Right, or click a bubble) asks at a higher priority. A label
## shows the client's per-frame poll cost; a panel says so when no gllm server is running.
##
## Headless self-test: godot --headless --path . -- --autotest [--host H] [--port P] [--line TEXT]
## says one line to every NPC once connected, prints each reply, and quits (exit code 0 when all three completed).
extends Control

const GllmNpcScript := preload("res://addons/gllm/gllm_npc.gd")
const GllmBridgeScript := preload("res://addons/gllm/gllm_bridge.gd")
const FACING_PRIORITY := 10
const TYPEWRITER_CPS := 45.0  # characters revealed per second
const AUTOTEST_TIMEOUT_MS := 90000

var npcs: Array[GllmNpcScript] = []
var bubbles: Array[Label] = []
var targets: Array[String] = []  # the full text each bubble types towards
var shown: Array[float] = []  # characters revealed so far
var facing := 0
var input: LineEdit
var cost_label: Label
var offline_panel: PanelContainer
var offline_label: Label
var poll_costs: Array[int] = []
var autotest := false
var autotest_offline := false  # print the offline panel's text when it shows
var autotest_line := "Good evening! What news from the north road?"
var autotest_start_ms := 0
var autotest_said := false
var finished := {}


func _ready() -> void:
	_parse_args()
	for child in get_children():
		if child is GllmNpcScript:
			npcs.append(child)
	_build_ui()
	for i in npcs.size():
		var npc := npcs[i]
		npc.text_received.connect(_on_text.bind(i))
		npc.completed.connect(_on_completed.bind(i))
		npc.failed.connect(_on_failed.bind(i))
	npcs[0].connection_changed.connect(_on_connection)
	_set_facing(0)
	autotest_start_ms = Time.get_ticks_msec()


func _bridge() -> GllmBridgeScript:
	return get_node("/root/Gllm") as GllmBridgeScript


func _parse_args() -> void:
	var args := OS.get_cmdline_user_args()
	var bridge := _bridge()
	var i := 0
	while i < args.size():
		match args[i]:
			"--autotest":
				autotest = true
			"--autotest-offline":
				autotest_offline = true
			"--host":
				i += 1
				bridge.host = args[i]
			"--port":
				i += 1
				bridge.port = int(args[i])
			"--line":
				i += 1
				autotest_line = args[i]
		i += 1


func _build_ui() -> void:
	var root := VBoxContainer.new()
	root.set_anchors_and_offsets_preset(Control.PRESET_FULL_RECT)
	root.add_theme_constant_override("separation", 12)
	add_child(root)
	var title := Label.new()
	title.text = "Eldmoor market: type a line and press Enter. Left/Right: face another NPC."
	root.add_child(title)
	var row := HBoxContainer.new()
	row.size_flags_vertical = Control.SIZE_EXPAND_FILL
	row.add_theme_constant_override("separation", 16)
	root.add_child(row)
	for i in npcs.size():
		var box := VBoxContainer.new()
		box.size_flags_horizontal = Control.SIZE_EXPAND_FILL
		row.add_child(box)
		var name_label := Label.new()
		name_label.text = npcs[i].npc_name
		box.add_child(name_label)
		var bubble := Label.new()
		bubble.autowrap_mode = TextServer.AUTOWRAP_WORD_SMART
		bubble.size_flags_vertical = Control.SIZE_EXPAND_FILL
		bubble.custom_minimum_size = Vector2(200, 120)
		bubble.mouse_filter = Control.MOUSE_FILTER_STOP
		bubble.gui_input.connect(_on_bubble_input.bind(i))
		box.add_child(bubble)
		bubbles.append(bubble)
		targets.append("")
		shown.append(0.0)
	input = LineEdit.new()
	input.placeholder_text = "Say something..."
	input.text_submitted.connect(_on_submitted)
	root.add_child(input)
	cost_label = Label.new()
	root.add_child(cost_label)
	offline_panel = PanelContainer.new()
	offline_panel.set_anchors_and_offsets_preset(Control.PRESET_CENTER)
	offline_label = Label.new()
	offline_panel.add_child(offline_label)
	add_child(offline_panel)
	_update_offline(false)


func _process(delta: float) -> void:
	for i in bubbles.size():  # typewriter: reveal the streamed text at a steady pace
		if shown[i] < targets[i].length():
			shown[i] = minf(targets[i].length(), shown[i] + TYPEWRITER_CPS * delta)
			bubbles[i].text = targets[i].substr(0, int(shown[i]))
	var bridge := _bridge()
	poll_costs.append(bridge.last_poll_usec)
	if poll_costs.size() > 120:
		poll_costs.pop_front()
	var worst: int = poll_costs.max()
	cost_label.text = (
		"gllm poll: %.3f ms this frame, %.3f ms worst of the last %d frames"
		% [bridge.last_poll_usec / 1000.0, worst / 1000.0, poll_costs.size()]
	)
	if autotest:
		_autotest_step(bridge)


func _unhandled_input(event: InputEvent) -> void:
	if event.is_action_pressed("ui_left"):
		_set_facing((facing + npcs.size() - 1) % npcs.size())
	elif event.is_action_pressed("ui_right"):
		_set_facing((facing + 1) % npcs.size())


func _on_bubble_input(event: InputEvent, i: int) -> void:
	if event is InputEventMouseButton and event.pressed:
		_set_facing(i)


func _set_facing(i: int) -> void:
	facing = i
	for j in npcs.size():
		npcs[j].priority = FACING_PRIORITY if j == i else 0
		bubbles[j].modulate = Color.WHITE if j == i else Color(1, 1, 1, 0.6)


func _on_submitted(line: String) -> void:
	if line.strip_edges().is_empty():
		return
	input.clear()
	_say_to_all(line)


func _say_to_all(line: String) -> void:
	for i in npcs.size():
		targets[i] = ""
		shown[i] = 0.0
		bubbles[i].text = ""
		npcs[i].say(line)


func _on_text(_id: String, _delta: String, full: String, i: int) -> void:
	targets[i] = full


func _on_completed(_id: String, info: Dictionary, i: int) -> void:
	targets[i] = info["text"]
	if autotest:
		print("NPC %s completed (%s): %s" % [npcs[i].npc_name, info["finish_reason"], info["text"].strip_edges()])
	finished[i] = info["finish_reason"] == "stop" or info["finish_reason"] == "length"


func _on_failed(_id: String, code: String, message: String, i: int) -> void:
	targets[i] = "(%s: %s)" % [code, message]
	shown[i] = 0.0
	if autotest:
		print("NPC %s failed: %s: %s" % [npcs[i].npc_name, code, message])
	finished[i] = false


func _on_connection(connected: bool) -> void:
	_update_offline(connected)


func _update_offline(connected: bool) -> void:
	var bridge := _bridge()
	offline_label.text = (
		"No gllm server at %s:%d.\nStart one with:  gllm serve\nThe game reconnects by itself."
		% [bridge.host, bridge.port]
	)
	offline_panel.visible = not connected
	input.editable = connected
	if autotest_offline and not connected:
		print("offline panel: " + offline_label.text.replace("\n", " | "))


func _autotest_step(bridge: GllmBridgeScript) -> void:
	if not autotest_said and bridge.client.is_connected_to_server():
		autotest_said = true
		print("connected to %s; saying: %s" % [bridge.client.welcome["model"], autotest_line])
		_say_to_all(autotest_line)
	var all_done := finished.size() == npcs.size()
	var timed_out := Time.get_ticks_msec() - autotest_start_ms > AUTOTEST_TIMEOUT_MS
	if all_done or timed_out:
		var ok := all_done and finished.values().all(func(x: bool) -> bool: return x)
		print(
			(
				"autotest: %d of %d NPCs completed a reply%s"
				% [finished.values().count(true), npcs.size(), " (timed out)" if timed_out else ""]
			)
		)
		autotest = false
		get_tree().quit(0 if ok else 1)
