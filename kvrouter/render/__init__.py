"""The config compiler: engine command lines, supervisord and systemd files."""
from kvrouter.render.compile import RenderOptions, compile_config, socket_path
from kvrouter.render.files import write_files

__all__ = ["RenderOptions", "compile_config", "socket_path", "write_files"]
