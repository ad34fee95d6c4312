"""The README's Python snippet runs as written and does what its comments say."""

import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_python_snippet_runs(capsys):
  with open(os.path.join(REPO, "README.md")) as f:
    blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
  assert len(blocks) == 1
  scope: dict = {}
  exec(compile(blocks[0], "README.md", "exec"), scope)  # noqa: S102 - our own README
  out = scope["out"]
  assert scope["logits"].shape == (2, 11, 256) and out.tokens_BN.shape == (2, 16)
  assert ((1 <= out.num_tokens_B) & (out.num_tokens_B <= 16)).all()
  assert capsys.readouterr().out.startswith("(2, 16) [")
