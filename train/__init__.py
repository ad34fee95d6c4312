"""The jaxlm training stack: `python -m train --config configs/<name>.yaml [key=value ...]`.

config.py (YAML -> frozen dataclasses), mesh.py (device mesh, logical-axis rules), state.py (sharded init),
optimizer.py (AdamW, schedule, clipping), step.py (jitted train/eval steps), checkpoint.py (orbax), data/ (MQAR,
packed text, synthetic), logs.py (progress, JSON-lines, TensorBoard), flops.py (MFU), run.py (the loop).
"""
