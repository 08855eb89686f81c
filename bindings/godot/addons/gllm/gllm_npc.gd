## An NPC that talks through gllm: a persona, a priority (raise it for the NPC the player faces), and its
## conversation (a [GllmNpcConversation] resource, for the save game). [method say] sends the player's line;
## the reply streams in through [signal text_received] and ends with [signal completed] or [signal failed].
##
## It uses the [GllmBridge] at [member bridge_path], else the "Gllm" autoload, else a bridge of its own (added as
## a child, connecting to 127.0.0.1:5555).
class_name GllmNpc
extends Node

## New text of this NPC's reply; [param full] is the reply so far.
signal text_received(id: String, delta: String, full: String)
## The reply ended (info: id, finish_reason, text, prompt_tokens, completion_tokens, cached_tokens, ttft_ms,
## total_ms, ttft_deadline_met, error, raw).
signal completed(id: String, info: Dictionary)
## The reply failed: a server error code or "disconnected".
signal failed(id: String, code: String, message: String)
## The shared client's session went up or down.
signal connection_changed(connected: bool)

const GllmBridgeScript := preload("gllm_bridge.gd")
const GllmClientScript := preload("gllm_client.gd")
const ConversationScript := preload("gllm_npc_conversation.gd")

## The NPC's name (logs, save games).
@export var npc_name := ""
## The persona: the system prompt sent with every request.
@export_multiline var persona := ""
## Scheduling priority of this NPC's replies (higher first): raise it for the NPC facing the player.
@export var priority := 0
## Generate fields for every reply (PROTOCOL.md §5.1 names: max_tokens, temperature, top_p, stop, seed, ...,
## max_tokens_per_s to pace the reply to the speech bubble, ttft_deadline_ms for a first-token deadline).
@export var settings: Dictionary = {"max_tokens": 64, "temperature": 0.7}
## The bridge to use; empty: the "Gllm" autoload, or a bridge of this node's own.
@export var bridge_path: NodePath
## The conversation so far (created from persona and settings when empty).
@export var conversation: ConversationScript

var bridge: GllmBridgeScript = null
var _mine := {}  # ids of this NPC's requests that have not ended


func _ready() -> void:
	if conversation == null:
		conversation = ConversationScript.new(npc_name, persona)
	if conversation.system_prompt.is_empty():
		conversation.system_prompt = persona
	if conversation.npc_name.is_empty():
		conversation.npc_name = npc_name if npc_name != "" else str(name)
	_find_bridge()
	_follow_client(true)


func _enter_tree() -> void:
	if bridge != null:  # back in the tree after a remove_child: follow the client again
		_follow_client(true)


func _exit_tree() -> void:
	if bridge != null:
		_follow_client(false)


func _follow_client(on: bool) -> void:
	var c := bridge.client
	for pair: Array in [
		[c.text_received, _on_text],
		[c.completed, _on_completed],
		[c.failed, _on_failed],
		[c.connection_changed, _on_connection],
	]:
		var sig: Signal = pair[0]
		if on and not sig.is_connected(pair[1]):
			sig.connect(pair[1])
		elif not on and sig.is_connected(pair[1]):
			sig.disconnect(pair[1])


## The shared client.
func get_client() -> GllmClientScript:
	return bridge.client if bridge != null else null


## The player says [param line] to this NPC; returns the request id. A reply still streaming is cancelled.
func say(line: String) -> String:
	for key: String in settings:
		conversation.settings[key] = settings[key]
	var id := conversation.say(bridge.client, line, priority)
	_mine[id] = true
	return id


## Stops the reply in flight.
func cancel() -> void:
	conversation.cancel()


## Whether a reply is streaming.
func is_talking() -> bool:
	return conversation.active_request_id != ""


func _find_bridge() -> void:
	var node: Node = null
	if not bridge_path.is_empty():
		node = get_node_or_null(bridge_path)
	if node == null:
		node = get_node_or_null("/root/Gllm")
	if node is GllmBridgeScript:
		bridge = node
		return
	bridge = GllmBridgeScript.new()
	bridge.name = "GllmBridge"
	add_child(bridge)


func _on_text(id: String, delta: String, full: String) -> void:
	if id == conversation.active_request_id:
		text_received.emit(id, delta, full)


func _on_completed(id: String, info: Dictionary) -> void:
	if _mine.erase(id):
		completed.emit(id, info)


func _on_failed(id: String, code: String, message: String) -> void:
	if _mine.erase(id):
		failed.emit(id, code, message)


func _on_connection(connected: bool) -> void:
	connection_changed.emit(connected)
