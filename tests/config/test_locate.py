from __future__ import annotations

from sft.config.locate import format_path, line_of, toml_lines, yaml_lines

TOML = '''# comment
base_model = "m"
lora_target_modules = [
  "q_proj",
  "v_proj",
]
notes = """
fake = 1
"""

[[datasets]]
path = "a"
roles.user = ["human"]

[datasets.message_property_mappings]
role = "from"

[[datasets]]
"type" = "alpaca"
'''


def test_toml_lines_follow_tables_arrays_and_multiline_values():
    lines = toml_lines(TOML)
    assert lines[("base_model",)] == 2
    assert lines[("lora_target_modules",)] == 3
    assert ("fake",) not in lines
    assert lines[("datasets", 0, "path")] == 12
    assert lines[("datasets", 0, "roles", "user")] == 13
    assert lines[("datasets", 0, "message_property_mappings", "role")] == 16
    assert lines[("datasets", 1, "type")] == 19
    assert line_of(lines, ("datasets", 1, "missing")) == 18


def test_yaml_lines():
    lines = yaml_lines("a: 1\nds:\n  - path: x\n    type: y\n")
    assert lines[("ds", 0, "type")] == 4
    assert format_path(("ds", 0, "type")) == "ds[0].type"
