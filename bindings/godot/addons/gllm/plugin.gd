## Enables the addon: registers the "Gllm" autoload (a [GllmBridge] that owns the shared [GllmClient] and polls
## it every frame).
@tool
extends EditorPlugin

const AUTOLOAD_NAME := "Gllm"


func _enable_plugin() -> void:
	add_autoload_singleton(AUTOLOAD_NAME, get_script().resource_path.get_base_dir().path_join("gllm_bridge.gd"))


func _disable_plugin() -> void:
	remove_autoload_singleton(AUTOLOAD_NAME)
