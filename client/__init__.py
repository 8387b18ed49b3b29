"""The torch.compile backend: capture, RPC client, plan executor and in-process fallback.

``hypatia.client.summary()`` says in one line what this process's compiles fused.
"""


def summary() -> str:
    """What this process compiled with ``backend="hypatia"`` fused, in one line: each rule with
    its count, most frequent first (``rms_norm x2, attention_fill_mask, linear_silu``)."""
    from hypatia.client.backend import summary as _summary  # torch is imported only when asked

    return _summary()
