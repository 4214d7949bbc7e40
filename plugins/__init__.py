"""Built-in plugins. Each subpackage is registered through its own `sft.plugins` entry point,
exactly like a third-party plugin; the core never imports them by name."""
