## Owns one [GllmClient] for the game and polls it every frame from [code]_process[/code] (also while the tree
## is paused), reporting the frame time to the server's frame budget. The addon registers one as the "Gllm"
## autoload; [GllmNpc] nodes find it there.
##
## The lease is kept from [code]_process[/code]: a main-thread stall longer than the server's lease_ms (5 s by
## default) ends the session; the client then fails the requests in flight ("disconnected"), emits
## connection_changed(false), says hello again by itself and emits connection_changed(true).
class_name GllmBridge
extends Node

const GllmClientScript := preload("gllm_client.gd")

@export var host := "127.0.0.1"
@export var port := 5555
## The server's shared secret (--token), "" for none.
@export var token := ""
@export var client_name := "godot/0.1"
## Connect when the node is ready (deferred one frame, so that a scene may change host and port first).
@export var auto_connect := true
## The most time poll() spends emitting events per frame; what is left waits for the next frame.
@export_range(0, 16000) var poll_budget_usec := 1000
## Report the frame times to the server, once per frame (the client sends one report per 250 ms: the smoothed
## time, the longest frame, the frame count and the frames over 1.1 x target); the engine computes a smaller share
## of the time while frames run over their target.
@export var report_frames := true
## The frame time the game aims for, sent with each frame report.
@export var target_frame_ms := 16.6

## The shared client.
var client: GllmClientScript = GllmClientScript.new()
## The cost of the last frame's poll(), in microseconds (for an on-screen counter).
var last_poll_usec := 0


func _ready() -> void:
	process_mode = Node.PROCESS_MODE_ALWAYS
	if auto_connect:
		connect_now.call_deferred()


## Connects the client to [member host]:[member port] (once; later calls do nothing).
func connect_now() -> void:
	if client.get_state() != GllmClientScript.State.IDLE:
		return
	client.client_name = client_name
	client.token = token
	client.connect_to_server(host, port)


func _process(delta: float) -> void:
	var t0 := Time.get_ticks_usec()
	client.poll(poll_budget_usec)
	last_poll_usec = Time.get_ticks_usec() - t0
	if report_frames:
		client.report_frame(delta * 1000.0, target_frame_ms)


func _exit_tree() -> void:
	client.close()
