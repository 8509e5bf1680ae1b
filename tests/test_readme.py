"""The README's usage example runs as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)   # noqa: S102 - our own README
    model, torch = namespace["model"], namespace["torch"]
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not any(type(m).__name__.startswith("MoHD") for m in model.modules())   # demohdified at the end
    assert namespace["tokens"].shape == (1, 12 + 5)
    assert torch.isfinite(namespace["loss"]).item()
    names = [n.name for n in namespace["gm"].graph.nodes if n.name.startswith("mohd_write__")]
    assert len(names) == 8


@pytest.mark.parametrize("command", ["pip install -e \".[examples]\" && python examples/quickstart.py",
                                     "pip install -e \".[test]\" && python -m pytest -q"])
def test_readme_setup_commands_are_the_ones_ci_and_users_run(command):
    text = README.read_text()
    assert command in text
    if "pytest" in command:
        ci = (README.parent / ".ci" / "run").read_text()
        line = next(ln for ln in text.splitlines() if command in ln)
        assert line.split("&& ", 2)[-1].strip() in ci
