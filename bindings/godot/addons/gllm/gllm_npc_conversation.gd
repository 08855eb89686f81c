## One NPC's side of the dialogue: its persona (system prompt) and the chat so far. It sends the chat with each
## line the player says, appends the NPC's reply when the request completes, trims the oldest turns so that the
## prompt and the reply fit the model's max_seq_len, and saves to the save game (as a Resource, or as JSON with
## [method to_json] / [method load_json]).
class_name GllmNpcConversation
extends Resource

## The reply so far, each time more of it arrives.
signal reply_updated(full: String)
## The active request ended with a done; a reply that ended with stop or length is in [member history] already.
signal reply_completed(info: Dictionary)
## The active request failed ("disconnected", "too_long", "busy", ...).
signal reply_failed(code: String, message: String)

const GllmClientScript := preload("gllm_client.gd")

## A name for logs and save games.
@export var npc_name := ""
## The persona: sent first, as the system message, with every request (and never trimmed).
@export_multiline var system_prompt := ""
## The chat after the system prompt: {"role": "user" or "assistant", "content": text}, oldest first.
@export var history: Array[Dictionary] = []
## Generate fields for every reply (PROTOCOL.md §5.1 names); prompt, messages and id are ignored.
@export var settings: Dictionary = {"max_tokens": 96, "temperature": 0.7}
## The context the prompt must fit; 0: the server's max_seq_len from the welcome.
@export var max_seq_len := 0
## Conservative estimate of UTF-8 bytes per token, for trimming (no tokenizer on the client).
@export var bytes_per_token := 2.5
## Tokens counted for each message's chat-template wrapping.
@export var tokens_per_message := 8

## The request in flight for this NPC, or "".
var active_request_id := ""
## The reply streamed so far for the active request.
var partial_reply := ""

var _client: GllmClientScript = null


func _init(p_name: String = "", p_system_prompt: String = "") -> void:
	npc_name = p_name
	system_prompt = p_system_prompt


## Follows the client's signals so that replies are appended by themselves.
func attach(client: GllmClientScript) -> void:
	if _client == client:
		return
	detach()
	_client = client
	client.text_received.connect(_on_text)
	client.completed.connect(_on_completed)
	client.failed.connect(_on_failed)


func detach() -> void:
	if _client == null:
		return
	_client.text_received.disconnect(_on_text)
	_client.completed.disconnect(_on_completed)
	_client.failed.disconnect(_on_failed)
	_client = null


## The player says a line: appends it, trims, sends the chat; returns the request id. A reply still running for
## this NPC is cancelled first (its partial reply is dropped). [param priority]: null keeps the settings'.
func say(client: GllmClientScript, line: String, priority: Variant = null) -> String:
	attach(client)
	if active_request_id != "":
		cancel()
	history.append({"role": "user", "content": line})
	var o := settings.duplicate()
	o.erase("id")
	o.erase("prompt")
	if priority != null:
		o["priority"] = priority
	var seq := max_seq_len
	if seq <= 0:
		seq = client.welcome.get("max_seq_len", 0)
	trim(seq, o.get("max_tokens", 256))
	o["messages"] = build_messages()
	partial_reply = ""
	active_request_id = client.generate(o)
	return active_request_id


## Stops the reply in flight; the player's line stays in the history without an answer.
func cancel() -> void:
	if active_request_id == "":
		return
	if _client != null:
		_client.cancel(active_request_id)
	active_request_id = ""
	partial_reply = ""


## The messages a request sends: the system prompt and the history.
func build_messages() -> Array:
	var out: Array = []
	if not system_prompt.is_empty():
		out.append({"role": "system", "content": system_prompt})
	for m in history:
		out.append({"role": m.get("role", "user"), "content": m.get("content", "")})
	return out


## Estimated prompt tokens of the current messages.
func estimate_tokens() -> int:
	var total := 0
	if not system_prompt.is_empty():
		total += _estimate(system_prompt)
	for m in history:
		total += _estimate(str(m.get("content", "")))
	return total


func _estimate(text: String) -> int:
	return tokens_per_message + ceili(text.to_utf8_buffer().size() / maxf(0.5, bytes_per_token))


## Drops the oldest turns (never the system prompt or the newest message) until the estimated prompt plus
## [param max_new_tokens] fits [param p_max_seq_len]. Returns how many messages were dropped.
func trim(p_max_seq_len: int, max_new_tokens: int) -> int:
	if p_max_seq_len <= 0:
		return 0
	var dropped := 0
	while history.size() > 1 and estimate_tokens() + max_new_tokens > p_max_seq_len:
		history.remove_at(0)
		dropped += 1
		# keep the chat starting with a user turn, as chat templates expect
		while history.size() > 1 and history[0].get("role") == "assistant":
			history.remove_at(0)
			dropped += 1
	return dropped


func _on_text(id: String, _delta: String, full: String) -> void:
	if id != active_request_id:
		return
	partial_reply = full
	reply_updated.emit(full)


func _on_completed(id: String, info: Dictionary) -> void:
	if id != active_request_id:
		return
	active_request_id = ""
	partial_reply = ""
	if info["finish_reason"] == "stop" or info["finish_reason"] == "length":
		history.append({"role": "assistant", "content": info["text"]})
	reply_completed.emit(info)


func _on_failed(id: String, code: String, message: String) -> void:
	if id != active_request_id:
		return
	active_request_id = ""
	partial_reply = ""
	reply_failed.emit(code, message)


## The conversation as JSON, for a save game.
func to_json() -> String:
	var h: Array = []
	for m in history:
		h.append({"role": m.get("role", "user"), "content": m.get("content", "")})
	return JSON.stringify({"name": npc_name, "system": system_prompt, "history": h, "max_seq_len": max_seq_len})


## Loads [method to_json]'s text into this conversation (replacing its name, persona and history); false when
## it is not a conversation.
func load_json(text: String) -> bool:
	var data: Variant = JSON.parse_string(text)
	if not (data is Dictionary):
		return false
	npc_name = str(data.get("name", ""))
	system_prompt = str(data.get("system", ""))
	max_seq_len = int(data.get("max_seq_len", 0))
	history.clear()
	var h: Variant = data.get("history")
	if h is Array:
		for m: Variant in h:
			if m is Dictionary:
				history.append({"role": str(m.get("role", "user")), "content": str(m.get("content", ""))})
	return true
